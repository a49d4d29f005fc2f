"""`prepare`: inputs -> validated, audited, patient-split, sharded TFRecords with a manifest, on Ray.

Two stages of Ray tasks, with only small metadata travelling back to the driver:
  1. decode + transform chunks of files; each task serialises its images as the finished TFRecord entries
     (label, keyed id and patient hashes, checksums: everything a record holds is known from the file and
     its input row) into a staging .rec file, with its per-file metadata (where each record lies, digests,
     perceptual hash, rejection reason) in a .json beside it;
  2. after the driver has audited duplicates and assigned splits, each task writes one output shard by
     copying its records' bytes from the staging files, in the shard's order.
Every file is written atomically, and a stage's output is its completion marker, so a killed run is
resumed by running the same command again: finished chunks and shards are skipped.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import secrets
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cxrscale.errors import CxrError
from cxrscale.files import atomic_path, check_writable_dir, read_json, write_bytes_atomic, write_json_atomic
from cxrscale.ray_cluster import start_ray
from preprocessing import audit, schema, split as splitting
from preprocessing.config import PrepareConfig
from preprocessing.describe import write_description
from preprocessing.records import Record, RecordHashes, SplitPlan, keyed_hash, utc_now
from preprocessing.sources import Discovery, InputItem, discover
from preprocessing.transform import ImageRejected, TransformParams, decode, transform_steps

log = logging.getLogger("cxrscale.preprocessing")

STAGING = ".cxrscale-staging"
MIN_RECORDS_PER_SHARD = 32
TARGET_SHARDS = 16  # enough for 8+ Horovod workers to each read their own files
MAX_RECORDS_PER_SHARD = 2048


# --- small pure helpers -----------------------------------------------------------------------------------

def chunk_size(n_items: int) -> int:
    """Files per stage-1 task: small enough to spread a small set over workers, large enough to amortise
    task overhead. Depends only on the input count, so a resumed run may use another --workers."""
    return int(min(64, max(8, math.ceil(n_items / 32))))


def shard_count(n_records: int, override: int | None = None) -> int:
    """Shards for a split of n records: 16 when there are enough records (>= 32 each), more for very large
    splits (<= 2048 records each), fewer for small ones; `override` caps at one record per shard."""
    if n_records == 0:
        return 0
    if override:
        return min(override, n_records)
    wanted = max(TARGET_SHARDS, math.ceil(n_records / MAX_RECORDS_PER_SHARD))
    return max(1, min(wanted, n_records // MIN_RECORDS_PER_SHARD))


# --- stage 1: decode and transform a chunk of files (runs in a Ray worker) --------------------------------

def _chunk_paths(staging: Path, index: int) -> tuple[Path, Path]:
    return staging / "chunks" / f"chunk-{index:05d}.rec", staging / "chunks" / f"chunk-{index:05d}.json"


def process_chunk(index: int, files: list[tuple[int, str, str, Any, str | None]], params: dict, salt: bytes,
                  staging: str) -> dict:
    """Transform one chunk of files [(item index, path, relative name, label, input patient key)] and stage
    the results.

    Writes chunk-XXXXX.rec (each accepted image's finished TFRecord entry, back to back; the label a class
    index or a multi-label record's targets) and then chunk-XXXXX.json (per-file metadata, with each
    record's byte span in the .rec); the .json is the completion marker. Returns the metadata.
    """
    import cv2

    cv2.setNumThreads(1)  # one Ray task per core already; OpenCV's own threads would oversubscribe
    tp = TransformParams.from_dict(params)
    staged, rows, accepted = io.BytesIO(), [], 0
    for item_index, path, rel, label, patient_key in files:
        row: dict[str, Any] = {"item": item_index}
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            decoded = decode(data, tp.size, tp.resize, name=path, params=tp)
            resized, image = transform_steps(decoded, tp)
            # the perceptual hash of the resized image: the same picture as the decoded pixels, already
            # shrunk, so the hash's own shrinking costs a tenth; from the decoded pixels when the resized one
            # is smaller than what the hash looks at (docs/benchmarks.md: the same findings either way)
            hashed = resized if min(resized.shape) >= audit.HASH_SIDE else decoded.pixels
            dicom_patient = keyed_hash(salt, "dicom", decoded.patient_id) if decoded.patient_id else None
            start = staged.tell()
            schema.write_record(staged, schema.encode_example(
                image, label, keyed_hash(salt, "id", rel),
                keyed_hash(salt, "patient", patient_key_of(patient_key, rel, dicom_patient)[0])))
            row.update(ok=True, row=accepted, at=[start, staged.tell() - start],
                       digest=audit.pixel_digest(decoded.pixels),
                       phash=[int(w) for w in audit.perceptual_hash(hashed)],
                       shape=list(decoded.original_shape), fmt=decoded.fmt, modality=decoded.modality,
                       view=decoded.view, burned_in=decoded.burned_in, transfer_syntax=decoded.transfer_syntax,
                       acquired=decoded.acquired, dicom_patient=dicom_patient)
            accepted += 1
        except ImageRejected as err:
            row.update(ok=False, reason=str(err))
        except FileNotFoundError:
            row.update(ok=False, reason="file not found")
        except OSError as err:
            row.update(ok=False, reason=f"unreadable file ({err.strerror or err})")
        except Exception as err:  # noqa: BLE001 - one odd file must not sink the run; it is reported
            row.update(ok=False, reason=f"could not be processed ({type(err).__name__}: {err})")
        rows.append(row)
    rec_path, json_path = _chunk_paths(Path(staging), index)
    write_bytes_atomic(rec_path, staged.getvalue())
    meta = {"chunk": index, "rows": rows}
    write_json_atomic(json_path, meta)
    return meta


# --- stage 2: write one output shard (runs in a Ray worker) -----------------------------------------------

def write_shard(output: str, staging: str, name: str, records: list[tuple[int, int, int]]) -> dict:
    """Write shard `name` from staged records: (chunk, byte offset, length) in its .rec file, in shard order.

    The shard appears atomically; a small .json in staging marks it done. Returns count, bytes, sha256.
    """
    digest = hashlib.sha256()
    size = 0
    target = Path(output) / name
    with contextlib.ExitStack() as stack:
        chunks: dict[int, int] = {}  # chunk -> an open .rec file's descriptor
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                for chunk, offset, length in records:
                    if chunk not in chunks:
                        chunks[chunk] = stack.enter_context(open(_chunk_paths(Path(staging), chunk)[0], "rb")).fileno()
                    data = os.pread(chunks[chunk], length, offset)
                    if len(data) != length:
                        raise OSError(f"staged chunk {chunk} ends before byte {offset + length}")
                    digest.update(data)
                    size += len(data)
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
    result = {"file": name, "records": len(records), "bytes": size, "sha256": digest.hexdigest()}
    write_json_atomic(Path(staging) / "shards" / f"{name}.json", result)
    return result


# --- Ray plumbing ---------------------------------------------------------------------------------------

def uses_ray(config: PrepareConfig) -> bool:
    """Whether the run starts or joins Ray: not for `--workers 1` on this machine (no --address), which runs
    every task in this process and saves Ray's start-up (seconds; more than a small dataset's whole work). A
    Ray the caller has already started is used all the same (`run_tasks`)."""
    return bool(config.address) or config.workers != 1


def submitted_at_once(workers: int | None) -> int:
    """How many stage tasks the driver keeps submitted to the running Ray (`run_tasks`), which runs one per
    CPU (each asks for one). With fewer --workers than the cluster's CPUs, that many: the cap the user asked
    for, also on a Ray the caller started. Otherwise two per CPU: when a task ends, the worker that ran it
    takes the next one queued by the same driver at once (Ray's task submitter keeps a worker's lease while
    its queue holds tasks, and returns it when the queue is empty), instead of idling while the driver
    hears of the end, submits again and Ray finds a worker, a round trip that costs most across nodes
    (docs/benchmarks.md, "Preprocessing: tasks queued ahead"). Without a running Ray the tasks run in this
    process, one by one."""
    ray = sys.modules.get("ray")  # not imported at all on the in-process path
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray is not None and ray.is_initialized() else 1
    if workers and workers < cpus:
        return workers
    return 2 * max(1, cpus)


def run_tasks(fn: Callable, arg_lists: list[tuple], in_flight: int, on_done: Callable[[Any], None]) -> None:
    """Run `fn(*args)` as Ray tasks, at most `in_flight` submitted at once (`submitted_at_once`), calling
    `on_done` with each result as it finishes (in completion order). Bounded in-flight work keeps memory
    flat and lets `--workers` cap use of an already-running Ray. Without a running Ray (`uses_ray` said
    no), one after the other in this process: the same function on the same arguments, so the same files."""
    ray = sys.modules.get("ray")  # not imported at all on the in-process path
    if ray is None or not ray.is_initialized():
        for args in arg_lists:
            on_done(fn(*args))
        return

    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    pending = list(arg_lists)[::-1]
    running: list = []
    while pending or running:
        while pending and len(running) < in_flight:
            running.append(remote.remote(*pending.pop()))
        done, running = ray.wait(running, num_returns=1)
        on_done(ray.get(done[0]))


# --- the output folder ----------------------------------------------------------------------------------

def _is_ours(name: str) -> bool:
    return (name in (schema.MANIFEST, schema.SPLIT_CSV, schema.AUDIT, STAGING)
            or bool(schema.SHARD_PATTERN.match(name)) or (name.startswith(".") and name.endswith(".tmp")))


def prepare_output(output: Path, scanned_root: Path | None, fingerprint: str, overwrite: bool) -> str:
    """Check the output folder and decide what to do: "done" (already prepared identically), "resume"
    or "fresh". `scanned_root` is the input folder that is searched for images (None for a CSV list).
    Removes only cxrscale's own files, and only with --overwrite."""
    out_abs = output.resolve()
    in_abs = scanned_root.resolve() if scanned_root else None
    if in_abs and (out_abs == in_abs or in_abs in out_abs.parents):
        raise CxrError(f"--output {output} is inside --input {scanned_root}: it would be read as input; "
                       "choose a folder outside it")
    if output.exists() and not output.is_dir():
        raise CxrError(f"--output {output} exists and is not a folder")
    if output.is_dir():
        foreign = sorted(p.name for p in output.iterdir() if not _is_ours(p.name))
        if foreign:
            raise CxrError(f"--output {output} already holds files that are not a cxrscale prepared dataset "
                           f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); choose a new folder")
        manifest_path, staging = output / schema.MANIFEST, output / STAGING
        previous = None
        if manifest_path.exists():
            previous = read_json(manifest_path, "existing manifest").get("fingerprint")
        elif staging.exists() and (staging / "run.json").exists():
            previous = read_json(staging / "run.json", "unfinished run record").get("fingerprint")
        if previous == fingerprint and manifest_path.exists() and not staging.exists():
            return "done"
        if previous == fingerprint:
            return "resume"
        if previous is not None or any(output.iterdir()):
            if not overwrite:
                raise CxrError(f"--output {output} holds a prepared dataset (or an unfinished run) made with "
                               "other arguments or inputs; re-run with the same ones to resume, or pass "
                               "--overwrite to replace it")
            log.warning("--overwrite: removing the previous prepared dataset in %s", output)
            for p in output.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    check_writable_dir(output, "--output")
    return "fresh"


def _read_salt_file(path: str) -> bytes:
    try:
        salt = Path(path).read_bytes()
    except OSError as err:
        raise CxrError(f"--salt-file {path} cannot be read: {err.strerror or err}") from None
    if len(salt) < 16:
        raise CxrError(f"--salt-file {path} holds {len(salt)} bytes; use at least 16 random bytes")
    return salt


def _salt_source(config: PrepareConfig) -> str:
    """Where the id salt comes from, for the manifest: never the salt itself."""
    if config.salt_file:
        return "file sha256:" + hashlib.sha256(_read_salt_file(config.salt_file)).hexdigest()[:16]
    return "random per run"


def _load_salt(config: PrepareConfig, staging: Path) -> bytes:
    """The salt for id hashes: from --salt-file, or random and kept in staging until the run completes
    (so a resumed run hashes the same way, and nothing can link two separate runs' ids)."""
    if config.salt_file:
        return _read_salt_file(config.salt_file)
    salt_path = staging / "salt"
    if not salt_path.exists():
        write_bytes_atomic(salt_path, secrets.token_bytes(32))
    return salt_path.read_bytes()


# --- the driver -----------------------------------------------------------------------------------------

def _patient_key(item: InputItem, dicom_patient: str | None) -> tuple[str, str]:
    return patient_key_of(item.patient_key, item.rel, dicom_patient)


def patient_key_of(input_key: str | None, rel: str, dicom_patient: str | None) -> tuple[str, str]:
    """Patient key and its source, by precedence: CSV column, DICOM PatientID (keyed hash), Kermany name,
    the file."""
    if input_key and input_key.startswith("csv:"):
        return input_key, "csv"
    if dicom_patient:
        return f"dicom:{dicom_patient}", "dicom"
    if input_key:
        return input_key, "filename"
    return f"file:{rel}", "file (no patient id found)"


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None, mininterval=1.0, leave=False)


def plan_pool(discovery: Discovery, config: PrepareConfig) -> tuple[dict[str, float], set[str]]:
    """Which splits to carve (with their fractions of the pool) and which given splits are pooled."""
    given = {item.given_split for item in discovery.items if item.given_split}
    carve = {s: f for s, f in (("val", config.val_fraction), ("test", config.test_fraction))
             if s not in given and f > 0}
    if config.split_by != "patient":
        if "test" in given:
            raise CxrError(f"--split-by {config.split_by} holds out the test split, but --input {config.input} "
                           "already gives one: drop one of them")
        if config.test_fraction <= 0 and not config.test_sources:
            raise CxrError(f"--split-by {config.split_by} needs --test-fraction > 0")
        carve.pop("test", None)  # held out by time or source in _plan_splits, not at random
    if config.resplit:
        if "train" not in given and discovery.layout != "class-folders":
            raise CxrError("--resplit pools the given train and val splits, but the input gives no train split")
        if config.val_fraction <= 0:
            raise CxrError("--resplit needs --val-fraction > 0")
        carve["val"] = config.val_fraction
    pooled = ({"train"} | ({"val"} if config.resplit else set())) if carve else set()
    return carve, pooled


def prepare(config: PrepareConfig) -> dict:
    """Run the preprocessing stage; returns the manifest (also written to OUTPUT/manifest.json)."""
    config.validate()
    params = config.transform_params()
    discovery = discover(config.input, uncertain=config.uncertain, blank=config.blank, labels=config.labels,
                         test_list=config.test_list)
    output = Path(config.output)
    staging = output / STAGING
    carve, pooled = plan_pool(discovery, config)

    salt_source = _salt_source(config)
    fingerprint = hashlib.sha256(repr((schema.SCHEMA_VERSION, config.output_defining(), salt_source,
                                       discovery.fingerprint())).encode()).hexdigest()
    scanned = None if discovery.layout in ("csv", "nih", "csv-columns") else discovery.root  # a CSV names its files
    state = prepare_output(output, scanned, fingerprint, config.overwrite)
    if state == "done":
        log.info("%s is already prepared with these inputs and arguments; nothing to do", output)
        return read_json(output / schema.MANIFEST, "manifest")
    for leftover in output.glob(".*.tmp"):
        leftover.unlink()  # partial writes of a killed run; their finished twins are complete files
    if state == "resume":
        log.info("resuming the unfinished run in %s", output)
    write_json_atomic(staging / "run.json", {"fingerprint": fingerprint, "started": utc_now()})
    salt = _load_salt(config, staging)

    items = discovery.items
    log.info("%d inputs in %s layout, %s: %s", len(items), discovery.layout,
             "labels" if discovery.multilabel else "classes", ", ".join(discovery.classes))
    ray_used = uses_ray(config)
    with (start_ray(config.address, config.workers, py_modules=[str(Path(__file__).resolve().parent)])
          if ray_used else contextlib.nullcontext()):
        in_flight = submitted_at_once(config.workers)
        clock = time.perf_counter()
        records, rejected, spans = _stage_transform(items, params, salt, staging, in_flight)
        log.info("stage 1 (decode, transform, hash): %.1f s", time.perf_counter() - clock)
        if not records:
            reasons = Counter(r["reason"] for r in rejected).most_common(3)
            raise CxrError(f"no usable images in --input {config.input}: all {len(items)} inputs were rejected ("
                           + "; ".join(f"{n} x {reason}" for reason, n in reasons) + ")")
        clock = time.perf_counter()
        plan = _plan_splits(records, discovery, carve, pooled, config)
        log.info("audit and split: %.1f s", time.perf_counter() - clock)
        clock = time.perf_counter()
        hashes = RecordHashes([keyed_hash(salt, "id", r.item.rel) for r in records],
                              [keyed_hash(salt, "patient", r.patient_key) for r in records])
        shards, shard_files = _stage_write(plan, spans, output, staging, in_flight, config)
        log.info("stage 2 (write %d shards): %.1f s", len(shards), time.perf_counter() - clock)

    manifest = write_description(output, discovery, config, params, fingerprint, salt_source, plan, hashes, shards,
                       shard_files, rejected + discovery.rejected, salt)
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _stage_transform(items: list[InputItem], params: TransformParams, salt: bytes, staging: Path,
                     in_flight: int) -> tuple[list[Record], list[dict], dict[tuple[int, int], tuple[int, int]]]:
    """Stage 1 over every chunk not staged yet; returns the accepted records, the rejected inputs and where each
    record's staged bytes lie ((chunk, row) -> (offset, length))."""
    size = chunk_size(len(items))
    chunks = [list(range(start, min(start + size, len(items)))) for start in range(0, len(items), size)]
    metas: dict[int, dict] = {}
    for index in range(len(chunks)):
        rec_path, json_path = _chunk_paths(staging, index)
        if json_path.exists() and rec_path.exists():
            metas[index] = read_json(json_path, "staged chunk metadata")
    todo = [i for i in range(len(chunks)) if i not in metas]
    if metas:
        log.info("stage 1: %d of %d chunks already done, %d to go", len(metas), len(chunks), len(todo))
    bar = _progress(sum(len(chunks[i]) for i in todo), "transform")

    def done(meta: dict) -> None:
        metas[meta["chunk"]] = meta
        bar.update(len(meta["rows"]))

    def label(item: InputItem):
        return item.targets if item.targets is not None else item.label

    args = [(i, [(k, items[k].path, items[k].rel, label(items[k]), items[k].patient_key) for k in chunks[i]],
             params.to_dict(), salt, str(staging)) for i in todo]
    run_tasks(process_chunk, args, in_flight, done)
    bar.close()

    records, rejected, spans = [], [], {}
    for index in range(len(chunks)):
        for row in metas[index]["rows"]:
            item = items[row["item"]]
            if not row["ok"]:
                rejected.append({"input": item.rel, "reason": row["reason"]})
                continue
            key, source = _patient_key(item, row.get("dicom_patient"))
            spans[(index, row["row"])] = tuple(row["at"])
            records.append(Record(item, index, row["row"], row["digest"], row["phash"], tuple(row["shape"]),
                                  row["fmt"], key, source, row.get("modality"), row.get("view"),
                                  row.get("burned_in"), row.get("transfer_syntax"), row.get("acquired")))
    return records, rejected, spans


def _plan_splits(records: list[Record], discovery: Discovery, carve: dict[str, float], pooled: set[str],
                 config: PrepareConfig) -> SplitPlan:
    exact = audit.exact_duplicate_groups([r.digest for r in records])
    near = audit.near_duplicate_pairs(np.array([r.phash for r in records], dtype=np.uint64),
                                      config.near_duplicate_distance)
    links = [(g[0], other) for g in exact for other in g[1:]] + [(i, j) for i, j, _ in near]
    groups = splitting.group_ids([r.patient_key for r in records], links)
    fixed = [None if (r.item.given_split is None or r.item.given_split in pooled) else r.item.given_split
             for r in records]
    labels = (np.array([r.item.targets for r in records], dtype=np.int64).reshape(len(records), -1)
              if discovery.multilabel else np.array([r.item.label for r in records]))
    test_origin = hold_out_test(records, groups, fixed, pooled, config)
    splits = splitting.assign_splits(labels, groups, fixed, carve, config.seed, config.given_overlap)
    overlapping = given_overlaps(records, groups, fixed)
    excluded = {k: why for k, why in overlapping.items() if splits[k] == splitting.EXCLUDED}
    kept = len(overlapping) - len(excluded)
    if excluded:
        log.info("%d pool images share a patient or duplicate group with a given held-out split: excluded from "
                 "train and val (listed in manifest.json; --given-overlap train keeps them)", len(excluded))
    if kept:
        log.warning("--given-overlap train: %d train images share a patient or duplicate group with a given "
                    "held-out split, so that split's figures are optimistic", kept)
    leaks = splitting.leaking_groups(groups, splits)
    if leaks:
        log.warning("%d patient/duplicate groups straddle the splits (see audit.json)", len(leaks))
    return SplitPlan(records, splits, groups, exact, near, excluded, kept, leaks, test_origin)


def hold_out_test(records: list[Record], groups: np.ndarray, fixed: list[str | None], pooled: set[str],
                  config: PrepareConfig) -> str:
    """For --split-by time or source, pin the held-out pool records to "test" in `fixed` (in place); return how
    the test split was made, in words."""
    given = {r.item.given_split for r in records if r.item.given_split and r.item.given_split not in pooled}
    if config.split_by == "patient":
        if "test" in given:
            return "given by the input"
        return "carved at random from the pool, grouped by patient" if config.test_fraction > 0 else "none"
    pool = np.array([f is None for f in fixed])
    if config.split_by == "time":
        times = [r.item.time or r.acquired for r in records]
        what = "acquisition time (a `time` column in the CSV, or a DICOM AcquisitionDateTime/StudyDate)"
    else:
        times = [r.item.source for r in records]
        what = "source (a `source` column in the CSV, or a folder below the class folder: CLASS/SOURCE/...)"
    missing = [r.item.rel for r, t, p in zip(records, times, pool) if p and not t]
    if missing:
        raise CxrError(f"--split-by {config.split_by}: {len(missing)} images have no {what}, e.g. {missing[0]}")
    try:
        if config.split_by == "time":
            held = splitting.latest_groups(groups, times, pool, config.test_fraction)
            origin = (f"held out by time: the latest {held.sum() / max(pool.sum(), 1):.0%} of the pool by "
                      "acquisition time (patients first seen last)")
        else:
            held, names = splitting.source_groups(groups, times, pool, config.test_fraction, config.test_sources,
                                                  config.seed)
            origin = f"held out by source: every image from {', '.join(names)}"
    except ValueError as err:
        raise CxrError(str(err)) from None
    for k in np.flatnonzero(held):
        fixed[k] = "test"
    log.info("test split %s (%d images)", origin, int(held.sum()))
    return origin


def given_overlaps(records: list[Record], groups: np.ndarray, fixed: list[str | None]) -> dict[int, str]:
    """Pool records (fixed None) whose group has a member in a given held-out split (val or test), with the
    reason: the same patient as an image there, or else a duplicate of one."""
    held_out: dict[int, list[int]] = {}
    for k, split in enumerate(fixed):
        if split in ("val", "test"):
            held_out.setdefault(int(groups[k]), []).append(k)
    out = {}
    for k, split in enumerate(fixed):
        members = held_out.get(int(groups[k])) if split is None else None
        if not members:
            continue
        names = sorted({str(fixed[j]) for j in members}, key=splitting.SPLIT_ORDER.index)
        where = " and ".join(names) + " split" + ("s" if len(names) > 1 else "")
        if any(records[j].patient_key == records[k].patient_key for j in members):
            out[k] = f"same patient as images of the given {where}"
        else:
            out[k] = f"duplicate of an image of the given {where}"
    return out


def _stage_write(plan: SplitPlan, spans: dict[tuple[int, int], tuple[int, int]], output: Path, staging: Path,
                 in_flight: int, config: PrepareConfig) -> tuple[list[dict], list[str]]:
    """Write every split's shards from the staged records; returns the manifest's shard entries and each
    record's shard file."""
    rng = np.random.default_rng(config.seed)
    jobs = []
    shard_files = [""] * len(plan.records)
    for split in schema.SPLITS:
        members = np.flatnonzero(plan.splits == split)
        members = members[rng.permutation(len(members))]  # mix classes and patients across shards
        count = shard_count(len(members), config.shards)
        for index, part in enumerate(np.array_split(members, count) if count else []):
            name = schema.shard_name(split, index, count)
            recs = []
            for k in part.tolist():
                record = plan.records[k]
                recs.append((record.chunk, *spans[(record.chunk, record.row)]))
                shard_files[k] = name
            jobs.append((split, name, recs))

    results: dict[str, dict] = {}
    for split, name, recs in jobs:
        marker = staging / "shards" / f"{name}.json"
        if marker.exists() and (output / name).exists():
            done = read_json(marker, "staged shard record")
            if done.get("records") == len(recs) and (output / name).stat().st_size == done.get("bytes"):
                results[name] = done
    todo = [(str(output), str(staging), name, recs) for _, name, recs in jobs if name not in results]
    if len(results):
        log.info("stage 2: %d of %d shards already written", len(results), len(jobs))
    bar = _progress(sum(len(a[3]) for a in todo), "write shards")

    def done(result: dict) -> None:
        results[result["file"]] = result
        bar.update(result["records"])

    run_tasks(write_shard, todo, in_flight, done)
    bar.close()
    entries = [{"file": name, "split": split, **{k: results[name][k] for k in ("records", "bytes", "sha256")}}
               for split, name, _ in jobs]
    return entries, shard_files
