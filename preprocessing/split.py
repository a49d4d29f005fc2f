"""Patient-grouped, stratified train/val/test assignment (pure functions).

A *group* is everything that must stay in one split: all images of a patient, joined with every image
that duplicates one of them (exactly or nearly). Groups are found with a union-find. With one class per image
they are placed greedily, largest first, into the split whose per-class counts move closest to their
targets; with several labels per image, by iterative stratification over groups (`iterative_groups`).
"""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import numpy as np

SPLIT_ORDER = ("train", "val", "test")
EXCLUDED = "excluded"          # a pool item left out of every split (see `assign_splits`)
OVERLAP_POLICIES = ("exclude", "train")


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def labels(self) -> np.ndarray:
        """Component label per element, numbered 0.. in order of first appearance."""
        roots = [self.find(i) for i in range(len(self.parent))]
        _, first_seen = np.unique(roots, return_inverse=True)
        return first_seen.astype(np.int64)


def group_ids(keys: Sequence[Hashable], links: Iterable[tuple[int, int]] = ()) -> np.ndarray:
    """Group label per item: items with equal keys, or linked by a (i, j) pair, share a label."""
    uf = UnionFind(len(keys))
    first: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        if key in first:
            uf.union(first[key], i)
        else:
            first[key] = i
    for i, j in links:
        uf.union(i, j)
    return uf.labels()


def assign_splits(labels: np.ndarray, groups: np.ndarray, fixed: Sequence[str | None],
                  fractions: dict[str, float], seed: int, overlap: str = "exclude") -> np.ndarray:
    """Split name per item: "train", "val", "test", or `EXCLUDED`.

    labels: (n,) class index per item, or (n, K) targets of a multi-label item (1 positive; 0 or -1 not),
        stratified by `iterative_groups`. groups: (n,) group label per item (see `group_ids`).
    fixed: the split an input layout already gives an item, or None for items in the pool to be split.
    fractions: the share of the pool each carved split receives, e.g. {"val": 0.1, "test": 0.1}; the rest
        of the pool goes to "train". Splits not named here are not carved.
    overlap: what happens to a pool item whose group has a member in a given held-out split (val or test):
        "exclude" (default) leaves it out of every split, so it can neither leak into training nor change
        the given split; "train" keeps it in train (the patient is then on both sides: a leak the caller
        must report). A given split always holds exactly the items given to it.
    """
    if overlap not in OVERLAP_POLICIES:
        raise ValueError(f"overlap must be one of {OVERLAP_POLICIES}, got {overlap!r}")
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    n = len(labels)
    n_classes = int(labels.max()) + 1 if n and labels.ndim == 1 else 0
    out = np.array([s or "" for s in fixed], dtype=object)
    pool = out == ""

    rank = {name: i for i, name in enumerate(SPLIT_ORDER)}
    pinned: dict[int, str] = {}
    for i in np.flatnonzero(~pool):
        g, split = int(groups[i]), out[i]
        if g not in pinned or rank[split] > rank[pinned[g]]:
            pinned[g] = split
    for i in np.flatnonzero(pool):
        split = pinned.get(int(groups[i]))
        if split is not None:
            out[i] = "train" if (split == "train" or overlap == "train") else EXCLUDED
            pool[i] = False

    carved = [s for s in SPLIT_ORDER if s != "train" and fractions.get(s, 0) > 0]
    targets_for = ["train"] + carved
    if labels.ndim == 2:
        pool_groups, inverse = np.unique(groups[pool], return_inverse=True)
        counts = np.zeros((len(pool_groups), labels.shape[1]), np.int64)
        np.add.at(counts, inverse, (labels[pool] == 1).astype(np.int64))
        shares = np.array([1.0 - sum(fractions[s] for s in carved)] + [fractions[s] for s in carved])
        chosen = iterative_groups(counts, np.bincount(inverse), shares, seed)
        out[np.flatnonzero(pool)] = np.array(targets_for, dtype=object)[chosen[inverse]]
        return out.astype(str)
    class_totals = np.bincount(labels[pool], minlength=n_classes).astype(float)
    target = np.array([[0.0] * n_classes] + [list(fractions[s] * class_totals) for s in carved])
    target[0] = class_totals - target[1:].sum(axis=0)
    current = np.zeros_like(target)

    pool_groups = np.unique(groups[pool])
    members = {int(g): np.flatnonzero(pool & (groups == g)) for g in pool_groups}
    rng = np.random.default_rng(seed)
    order = rng.permutation(pool_groups)
    order = sorted(order, key=lambda g: -len(members[int(g)]))  # stable: ties keep the random order
    for g in order:
        idx = members[int(g)]
        counts = np.bincount(labels[idx], minlength=n_classes)
        # Increase of the squared distance to the targets if the group joined each split.
        cost = (counts * (2 * (current - target) + counts)).sum(axis=1)
        best = int(np.argmin(cost))
        current[best] += counts
        out[idx] = targets_for[best]
    return out.astype(str)


def iterative_groups(counts: np.ndarray, sizes: np.ndarray, shares: np.ndarray, seed: int) -> np.ndarray:
    """Split index per group by iterative stratification (Sechidis, Tsoumakas and Vlahavas, ECML PKDD 2011),
    over groups weighted by their images: counts (G, K) positive images per group and label, sizes (G,) images
    per group, shares (S,) each split's share of the images.

    The label with the fewest positive images not yet placed goes first: each group holding it, the largest
    first, joins the split that still wants the most of that label (ties: the most images, then at random),
    and every split's wants drop by the group's counts. Groups with no positive go last, largest first, where
    the most images are still wanted. Groups are weighed by their images because a patient may have one image
    or hundreds: the `iterative-stratification` package stratifies samples and ignores groups, so it could only
    be handed one row per patient (measured against this in `benchmarks.split`, docs/multilabel.md)."""
    rng = np.random.default_rng(seed)
    wanted = np.outer(shares, counts.sum(axis=0)).astype(float)
    room = shares * sizes.sum()
    out = np.full(len(sizes), -1, dtype=np.int64)
    left = np.ones(len(sizes), dtype=bool)
    tiebreak = rng.random(len(sizes))

    def best_of(candidates: np.ndarray) -> int:
        if len(candidates) > 1:
            candidates = candidates[room[candidates] == room[candidates].max()]
        return int(candidates[0] if len(candidates) == 1 else rng.choice(candidates))

    while left.any():
        remaining = counts[left].sum(axis=0)
        if not remaining.any():
            for g in np.flatnonzero(left)[np.lexsort((tiebreak[left], -sizes[left]))]:
                split = best_of(np.flatnonzero(room == room.max()))
                out[g] = split
                room[split] -= sizes[g]
            break
        rarest = np.flatnonzero(remaining == remaining[remaining > 0].min())
        label = int(rarest[0] if len(rarest) == 1 else rng.choice(rarest))
        holders = np.flatnonzero(left & (counts[:, label] > 0))
        for g in holders[np.lexsort((tiebreak[holders], -counts[holders, label]))]:
            want = wanted[:, label]
            split = best_of(np.flatnonzero(want == want.max()))
            out[g] = split
            wanted[split] -= counts[g]
            room[split] -= sizes[g]
            left[g] = False
    return out


def leaking_groups(groups: np.ndarray, splits: np.ndarray) -> list[int]:
    """Group labels whose members sit in more than one split (only possible through given splits, or
    overlap="train"); excluded items sit in none."""
    seen: dict[int, str] = {}
    leaks = set()
    for g, s in zip(groups.tolist(), splits.tolist()):
        if s == EXCLUDED:
            continue
        if seen.setdefault(g, s) != s:
            leaks.add(g)
    return sorted(leaks)


SPLIT_BY = ("patient", "time", "source")


def latest_groups(groups: np.ndarray, times: Sequence[str], pool: np.ndarray, fraction: float) -> np.ndarray:
    """Temporal validation (TRIPOD type 2b): a mask of the pool items whose group came last. A group's time is
    its earliest image's (`times`: sortable strings, one per item), so a patient first seen in the held-out
    period is held out whole; groups are taken from the latest back until `fraction` of the pool is held out.
    """
    first: dict[int, str] = {}
    for g, t, in_pool in zip(groups.tolist(), times, pool.tolist()):
        if in_pool and (g not in first or t < first[g]):
            first[g] = t
    size = np.bincount(groups[pool], minlength=int(groups.max()) + 1 if len(groups) else 0)
    held: set[int] = set()
    target, count = fraction * int(pool.sum()), 0
    for g in sorted(first, key=lambda g: (first[g], g), reverse=True):
        if count >= target:
            break
        held.add(g)
        count += int(size[g])
    return pool & np.isin(groups, sorted(held))


def source_groups(groups: np.ndarray, sources: Sequence[str], pool: np.ndarray, fraction: float,
                  named: Sequence[str], seed: int) -> tuple[np.ndarray, list[str]]:
    """External validation by source (TRIPOD type 3): (mask of held-out pool items, the held-out sources).
    `named` sources are held out; without names, whole sources in a seeded random order until `fraction` of
    the pool is held out, never all of them. A patient group with an image from a held-out source is held out
    whole, so no patient is on both sides."""
    names = sorted({s for s, p in zip(sources, pool.tolist()) if p})
    if named:
        unknown = sorted(set(named) - set(names))
        if unknown:
            raise ValueError(f"--test-sources {', '.join(unknown)}: no such source (sources: {', '.join(names)})")
        held = list(named)
    else:
        if len(names) < 2:
            raise ValueError(f"--split-by source needs images from at least two sources, found "
                             f"{len(names)} ({', '.join(names) or 'none'})")
        counts = {n: sum(1 for s, p in zip(sources, pool.tolist()) if p and s == n) for n in names}
        held, total = [], 0
        for name in np.random.default_rng(seed).permutation(names).tolist():
            if total >= fraction * int(pool.sum()) or len(held) == len(names) - 1:
                break
            held.append(name)
            total += counts[name]
    if set(held) >= set(names):
        raise ValueError("--test-sources names every source: nothing would be left to train on")
    touched = {int(g) for g, s, p in zip(groups.tolist(), sources, pool.tolist()) if p and s in held}
    return pool & np.isin(groups, sorted(touched)), sorted(held)
