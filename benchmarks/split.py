"""python -m benchmarks.split: patient-grouped, multi-label-stratified splits on the real NIH ChestX-ray14 table.

Reads `Data_Entry_2017.csv` (labels only: 112,120 rows, 30,805 patients, 14 findings) through the toolkit's own
reader (`preprocessing.sources.discover`, its NIH form) and carves validation and test with
`preprocessing.split.assign_splits`, as `python -m preprocessing` does; without the images there are no
duplicate links, so the groups are the patients. For each seed it measures:
  leakage         patients with images in more than one split (must be 0)
  deviation       each label's prevalence in each split against its prevalence in the whole table, relative:
                  |p_split - p| / p; the worst over splits and seeds, for the labels with >= 1,000 positive
                  images and for Hernia (227)
  seconds         reading the table, and splitting it
and the same iterative stratification given one unweighted row per patient (a patient positive for a label if
any of its images is), which is what a sample-level stratifier such as the `iterative-stratification`
package sees when it is handed patients: the figure that says what weighting groups by their images buys.
Goals: leakage 0, deviation <= 0.05 for the frequent labels and <= 0.15 for Hernia (a 10 % split holds about
23 Hernia images, so one image is 4 %), splitting in <= 10 s.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.common import DEFAULT_RESULTS, DEFAULT_SHARED_DATA, check, checks_table, markdown_table, report
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from cxrscale.errors import CxrError

log = logging.getLogger("cxrscale.benchmarks")
NIH_TABLE = DEFAULT_SHARED_DATA / "nih-labels" / "Data_Entry_2017_v2020.csv.gz"
FREQUENT = 1000       # positive images for a label to count as frequent
RARE = "Hernia"


def deviations(targets: np.ndarray, splits: np.ndarray) -> dict[str, list[float]]:
    """{split: relative prevalence deviation per label} for the splits present."""
    overall = (targets == 1).mean(axis=0)
    out = {}
    for name in ("train", "val", "test"):
        chosen = splits == name
        if chosen.any():
            out[name] = (np.abs((targets[chosen] == 1).mean(axis=0) - overall) / overall).tolist()
    return out


def measure(table: Path, seeds: int, val: float, test: float) -> dict:
    from preprocessing import split as splitting
    from preprocessing.sources import discover

    if not table.is_file():
        raise CxrError(f"--table {table} does not exist: the NIH label table (Data_Entry_2017.csv) is needed")
    started = time.perf_counter()
    found = discover(table, option="--table")
    read_seconds = time.perf_counter() - started
    if found.layout != "nih":
        raise CxrError(f"--table {table} is not an NIH table (Image Index, Finding Labels columns)")
    targets = np.array([item.targets for item in found.items], dtype=np.int64)
    patients = [item.patient_key for item in found.items]
    groups = splitting.group_ids(patients)
    fractions = {"val": val, "test": test}
    runs = []
    for seed in range(seeds):
        started = time.perf_counter()
        splits = splitting.assign_splits(targets, groups, [None] * len(targets), fractions, seed)
        seconds = time.perf_counter() - started
        # the baseline: one unweighted row per patient, positive where any of its images is
        counts = np.zeros((groups.max() + 1, targets.shape[1]), np.int64)
        np.add.at(counts, groups, (targets == 1).astype(np.int64))
        shares = np.array([1 - val - test, val, test])
        per_patient = splitting.iterative_groups((counts > 0).astype(np.int64), np.ones(len(counts), np.int64),
                                                 shares, seed)
        baseline = np.array(["train", "val", "test"])[per_patient][groups]
        runs.append({"seed": seed, "seconds": seconds,
                     "leaking_patients": len(splitting.leaking_groups(groups, splits)),
                     "shares": {s: float(np.mean(splits == s)) for s in ("train", "val", "test")},
                     "deviation": deviations(targets, splits), "baseline_deviation": deviations(targets, baseline),
                     "baseline_shares": {s: float(np.mean(baseline == s)) for s in ("train", "val", "test")}})
    positives = (targets == 1).sum(axis=0)
    return {"table": str(table), "rows": len(targets), "patients": int(groups.max() + 1), "labels": found.classes,
            "positives": positives.tolist(), "read_seconds": read_seconds, "fractions": fractions, "runs": runs}


def _worst(results: dict, key: str, chosen) -> float:
    return max(max(dev[k] for k in chosen) for run in results["runs"] for dev in run[key].values())


def summarise(results: dict) -> tuple[list[dict], str]:
    labels, positives = results["labels"], results["positives"]
    frequent = [k for k, n in enumerate(positives) if n >= FREQUENT]
    rare = [labels.index(RARE)] if RARE in labels else []
    worst = {key: (_worst(results, key, frequent), _worst(results, key, rare) if rare else None)
             for key in ("deviation", "baseline_deviation")}
    checks = [check("patients in more than one split (every seed)",
                    max(r["leaking_patients"] for r in results["runs"]), "<=", 0),
              check(f"worst relative prevalence deviation, labels with >= {FREQUENT} positives", worst["deviation"][0],
                    "<=", 0.05),
              check("slowest split of the table (s)", max(r["seconds"] for r in results["runs"]), "<=", 10)]
    if rare:
        checks.insert(2, check(f"worst relative prevalence deviation, {RARE}", worst["deviation"][1], "<=", 0.15))
    rows = []
    for k, name in enumerate(labels):
        dev = [max(run["deviation"][s][k] for run in results["runs"]) for s in ("train", "val", "test")]
        base = [max(run["baseline_deviation"][s][k] for run in results["runs"]) for s in ("train", "val", "test")]
        rows.append([name, positives[k], *(f"{d:.3f}" for d in dev), *(f"{d:.3f}" for d in base)])
    shares = results["runs"][0]["shares"]
    base_shares = results["runs"][0]["baseline_shares"]
    md = "\n\n".join([
        "## Multi-label split of the NIH ChestX-ray14 table",
        f"{results['rows']:,} images of {results['patients']:,} patients, {len(labels)} findings, read in "
        f"{results['read_seconds']:.1f} s; val {results['fractions']['val']:.0%} and test "
        f"{results['fractions']['test']:.0%} carved by patient, over {len(results['runs'])} seeds.",
        checks_table(checks),
        "Worst relative prevalence deviation |p_split - p| / p over the seeds, per split: the toolkit's iterative "
        "stratification over patients weighted by their images, and the same algorithm given one unweighted row "
        "per patient (what a sample-level stratifier sees).",
        markdown_table(["finding", "positive images", "train", "val", "test", "per-patient train", "per-patient val",
                        "per-patient test"], rows),
        f"Image shares (seed 0): weighted {shares['train']:.4f} / {shares['val']:.4f} / {shares['test']:.4f}; "
        f"per-patient {base_shares['train']:.4f} / {base_shares['val']:.4f} / {base_shares['test']:.4f}. Worst "
        f"frequent-label deviation: weighted {worst['deviation'][0]:.3f}, per-patient "
        f"{worst['baseline_deviation'][0]:.3f}.",
    ])
    return checks, md


def run_suite(quick: bool, work: Path) -> dict:
    """For `python -m benchmarks`: the shared NIH table, 3 seeds (quick) or 10."""
    return measure(NIH_TABLE, 3 if quick else 10, 0.1, 0.1)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks.split", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="examples:\n  python -m benchmarks.split\n"
                             "  python -m benchmarks.split --table ~/nih/Data_Entry_2017.csv --seeds 10")
    p.add_argument("--table", type=Path, default=NIH_TABLE, help="the NIH label table (default: the shared one)")
    p.add_argument("--seeds", type=int, default=10, help="splits measured, one per seed")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--quick", action="store_true", help="3 seeds")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise CxrError(f"--seeds must be at least 1, got {args.seeds}")
    if not (0 < args.val_fraction < 1 and 0 < args.test_fraction < 1 and args.val_fraction + args.test_fraction < 1):
        raise CxrError("--val-fraction and --test-fraction must be in (0, 1) and leave something to train on")
    setup_logging()
    results = measure(args.table, 3 if args.quick else args.seeds, args.val_fraction, args.test_fraction)
    report(args.out, "split", results, summarise)
    return 0


if __name__ == "__main__":
    run_cli(main)
