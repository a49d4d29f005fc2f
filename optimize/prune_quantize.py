"""python -m optimize.prune_quantize: smaller, faster variants of a trained model, each measured.

    python -m optimize.prune_quantize --run runs/kermany-cnn
    horovodrun -np 2 python -m optimize.prune_quantize --run runs/kermany-cnn --sparsity 0.5,0.8 --fine-tune-epochs 2
    python -m optimize.prune_quantize --run runs/sample --variants ptq-int8,ptq-float16

Variants: post-training quantization through the TFLite converter (ptq-dynamic, ptq-float16, ptq-int8 with a
representative dataset from the train split), magnitude pruning to each --sparsity (prune-NN), quantization-
aware training (qat) and pruning-preserving QAT (prune-qat-NN). Fine-tuning runs data-parallel under
horovodrun; rank 0 converts, evaluates (with distributed.evaluate's code, threshold chosen on validation)
and measures every variant and the original model as an fp32 TFLite file: size, gzip size, sparsity,
int8 share, latency per image (1 and 2 threads) and interpreter memory. Finished variants are kept and a
re-run resumes; a variant that cannot be built is skipped with the reason.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from distributed.evaluation.scores import (ThresholdRule, compute_metrics, evaluated_rule, parse_threshold,
                                           score_split)
from distributed.model.heads import Head
from distributed.model.scoring import load_scorer, read_run_config, run_model_path
from cxrscale import tracking
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, config_from, run_cli
from cxrscale.console import setup_logging
from cxrscale.files import (check_writable_dir, read_json, sha256_file, write_bytes_atomic, write_json_atomic,
                            write_text_atomic)
from cxrscale.provenance import code_version
from optimize import measure
from preprocessing import schema

if TYPE_CHECKING:
    from distributed.model.kerasenv import keras

log = logging.getLogger("cxrscale.optimize")

VARIANTS = ("ptq-dynamic", "ptq-float16", "ptq-int8", "prune", "qat", "prune-qat")
BASELINE = "fp32"


@dataclass(frozen=True)
class Variant:
    family: str  # fp32, ptq-*, prune, qat, prune-qat
    sparsity: float | None = None

    @property
    def name(self) -> str:
        return f"{self.family}-{round(100 * self.sparsity)}" if self.sparsity is not None else self.family

    @property
    def fine_tuned(self) -> bool:
        return self.family in ("prune", "qat", "prune-qat")

    @property
    def tflite_kind(self) -> str:
        return {"fp32": "fp32", "ptq-dynamic": "dynamic", "ptq-float16": "float16", "ptq-int8": "int8",
                "prune": "fp32", "qat": "int8", "prune-qat": "int8"}[self.family]


def expand_variants(families: Sequence[str], sparsities: Sequence[float]) -> list[Variant]:
    """The fp32 baseline first, then each family (pruned ones once per sparsity)."""
    out = [Variant(BASELINE)]
    for family in families:
        if family in ("prune", "prune-qat"):
            out += [Variant(family, s) for s in sparsities]
        else:
            out.append(Variant(family))
    return out


# --- data -----------------------------------------------------------------------------------------------

def representative_images(data_dir: Path, n: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """n images (and their record ids) drawn from the train split only, for int8 calibration."""
    ds = schema.dataset(data_dir, "train", with_ids=True).shuffle(4096, seed=seed, reshuffle_each_iteration=False)
    images, ids = [], []
    for image, _, rid in ds.take(n).as_numpy_iterator():
        images.append(image)
        ids.append(rid.decode())
    if not images:
        raise CxrError(f"the train split of {data_dir} is empty: no representative images for int8 calibration")
    return images, ids


@dataclass(frozen=True)
class PruneQuantizeConfig:
    """Every option of `python -m optimize.prune_quantize` (see `build_parser`), as `parse_config` builds it
    (output and data resolved from the run when not given)."""

    run: str
    data: str
    output: str
    variants: tuple[str, ...] = VARIANTS
    sparsity: tuple[float, ...] = (0.5, 0.8)
    fine_tune_epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-4
    representative_samples: int = 256
    bn_samples: int = 1024
    threshold: ThresholdRule = ThresholdRule("youden")
    max_auc_drop: float = 0.01
    bootstrap: int = 200
    threads: tuple[int, ...] = (1, 2)
    latency_runs: int = 50
    overwrite: bool = False
    seed: int = 0
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    quiet: bool = False


def fine_tune(model: keras.Model, config: PruneQuantizeConfig, hvd, plan, extra_callbacks: list,
              class_weight: dict | list | None) -> None:
    """A few epochs of data-parallel training of a wrapped (pruning / QAT) model on the train split.
    class_weight: fit()'s class weights, or a multi-label head's (negative, positive) weight per label."""
    from distributed.model.kerasenv import keras
    from distributed.training.data import train_dataset

    size = hvd.size()
    optimizer = keras.optimizers.Adam(learning_rate=config.lr * size)
    if size > 1:
        optimizer = hvd.DistributedOptimizer(optimizer)
    head = Head.of_model(model)
    if head.multilabel:  # the run's masked, per-label weighted loss; fit() takes no class weights for it
        model.compile(optimizer=optimizer, loss=head.loss(label_weights=class_weight))
        class_weight = None
    else:
        model.compile(optimizer=optimizer, loss=head.loss())
    ds = train_dataset(config.data, plan, config.batch_size, seed=config.seed + hvd.rank(), shuffle_buffer=1024,
                       augment=False, label_form=head.label_form)
    callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), *extra_callbacks]
    model.fit(ds, steps_per_epoch=plan.steps_per_epoch, epochs=config.fine_tune_epochs, callbacks=callbacks,
              class_weight=class_weight, verbose=2 if hvd.rank() == 0 else 0)


def build_fine_tuned(variant: Variant, base: keras.Model, config: PruneQuantizeConfig, hvd, plan, class_weight,
                     bn_images: Callable[[], np.ndarray]) -> tuple[keras.Model, dict]:
    """Prune and/or quantization-aware-train `base`; returns the model to convert and facts about it.
    bn_images: the train images pruned models re-estimate their BatchNormalization statistics on."""
    import tensorflow_model_optimization as tfmot

    from distributed.model.builders import recalibrate_batchnorm
    from optimize import compress

    facts: dict[str, Any] = {}
    model = base
    if variant.family in ("prune", "prune-qat"):
        wrapped = compress.prune_wrap(base, variant.sparsity, plan.steps_per_epoch * config.fine_tune_epochs)
        fine_tune(wrapped, config, hvd, plan, [tfmot.sparsity.keras.UpdatePruningStep()], class_weight)
        model = compress.strip_pruning(wrapped)
        if config.bn_samples:
            images = bn_images()
            facts["batchnorm_recalibrated"] = {"layers": recalibrate_batchnorm(model, images),
                                               "train_images": len(images)}
        facts["layer_sparsity"] = compress.layer_sparsity(model)
        facts["pruned_layers"] = compress.prune_targets(base)
    if variant.family in ("qat", "prune-qat"):
        model = compress.quantize_wrap(model, preserve_sparsity=variant.family == "prune-qat")
        fine_tune(model, config, hvd, plan, [], class_weight)
    return model, facts


# --- evaluate and measure -------------------------------------------------------------------------------

def finding_quality(val, test, findings: list[str], config: PruneQuantizeConfig,
                    baseline_probs: np.ndarray | None) -> dict:
    """A multi-label variant's figures: the macro ROC-AUC of validation and test (with its interval), each
    finding's test AUC (None where too few images measure it), and how far its test probabilities are from
    the fp32 model's, over every finding."""
    from distributed.evaluation.findings import finding_summary
    from distributed.model import metrics as mt

    summary = finding_summary(val.labels, val.probs, test.labels, test.probs, findings, config.threshold,
                              val_shifted=val.shifted, n_bootstrap=config.bootstrap, seed=config.seed)
    macro = summary.get("macro_roc_auc") or {}
    if not macro:
        raise CxrError(f"{config.data}: no finding has {summary['min_cases']} positive and negative test images, "
                       "so the variants cannot be compared on it")
    out = {"val_auc": mt.macro_roc_auc(val.labels, val.probs), "test_auc": macro["value"],
           "test_auc_ci": [macro.get("low"), macro.get("high")],
           "test_auc_per_finding": {r["finding"]: (r["intervals"]["roc_auc"]["value"] if r["measured"] else None)
                                    for r in summary["findings"]},
           "test_accuracy": None, "test_sensitivity": None, "test_specificity": None, "threshold": None}
    if baseline_probs is not None:
        diff = np.abs(test.probs - baseline_probs)
        out["max_prob_diff_vs_fp32"] = float(diff.max())
        out["mean_prob_diff_vs_fp32"] = float(diff.mean())
    return out


def evaluate_variant(path: Path, config: PruneQuantizeConfig, classes: list[str],
                     baseline_probs: np.ndarray | None, head: Head | None = None) -> dict:
    """Validation and test metrics at the validation-chosen threshold, and how far its test probabilities
    are from the fp32 model's; for a multi-label model, the macro AUC and each finding's test AUC. head: the
    model's (a .tflite file does not say whether K sigmoid units are a multi-label head)."""
    scorer = load_scorer(path, num_threads=2, head=head)
    val = score_split(scorer, config.data, "val", config.batch_size, shifted=config.threshold.needs_shifts)
    test = score_split(scorer, config.data, "test", config.batch_size)
    if scorer.head.multilabel:
        return finding_quality(val, test, classes, config, baseline_probs)
    m = compute_metrics(val, test, classes, config.threshold, n_bootstrap=config.bootstrap, seed=config.seed)
    at = m["at_threshold"]
    out = {"val_auc": m["validation_at_threshold"]["roc_auc"], "test_auc": at["roc_auc"],
           "test_auc_ci": [at["intervals"]["roc_auc"].get("low"), at["intervals"]["roc_auc"].get("high")],
           "test_accuracy": at["accuracy"], "test_sensitivity": at["sensitivity"],
           "test_specificity": at["specificity"], "threshold": m["threshold"]["value"]}
    if baseline_probs is not None:
        diff = np.abs(test.probs[:, 1] - baseline_probs[:, 1])
        out["max_prob_diff_vs_fp32"] = float(diff.max())
        out["mean_prob_diff_vs_fp32"] = float(diff.mean())
    return out


def measure_variant(path: Path, config: PruneQuantizeConfig) -> dict:
    timing = measure.latency(path, threads=config.threads, warmup=10, runs=config.latency_runs, seed=config.seed)
    report = measure.weight_report(path)
    return {**measure.sizes(path), "weight_dtypes": report["weight_dtypes"], "int8_fraction": report["int8_fraction"],
            "sparsity": report["sparsity"], "latency": timing["threads"],
            "peak_rss_delta_mb": timing["peak_rss_delta_mb"]}


def measurement_key(config: PruneQuantizeConfig) -> dict:
    """What a variant's evaluation and latency depend on beyond its .tflite file: a recorded measurement made
    with anything else is made again. The code is named by its commit (and whether the tree was edited)."""
    return {"latency_runs": config.latency_runs, "threads": list(config.threads), "bootstrap": config.bootstrap,
            "threshold_rule": str(config.threshold), "code": code_version()}


# --- the command ----------------------------------------------------------------------------------------

def done_record(out: Path, variant: Variant) -> dict | None:
    """The finished record of a variant (its .tflite present with the recorded checksum), else None."""
    record_path = out / "variants" / f"{variant.name}.json"
    if not record_path.is_file():
        return None
    record = read_json(record_path, "variant record")
    tflite = out / record.get("file", "")
    if not tflite.is_file() or sha256_file(tflite) != record.get("sha256"):
        return None
    return record


def prepare_output(config: PruneQuantizeConfig) -> Path:
    out = Path(config.output)
    check_writable_dir(out, "--output")
    settings = {k: getattr(config, k) for k in ("data", "sparsity", "fine_tune_epochs", "batch_size", "lr",
                                               "representative_samples", "bn_samples", "seed")}
    settings["threshold"] = str(config.threshold)
    settings["model_sha256"] = sha256_file(Path(config.run) / "model" / "saved_model.pb")
    settings_path = out / "settings.json"
    if settings_path.is_file() and not config.overwrite:
        previous = read_json(settings_path, "optimize settings")
        if previous != {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}:
            raise CxrError(f"{out} holds variants made with other settings or another model: pass --overwrite to "
                           "replace them, or choose another --output")
    if config.overwrite:
        for name in ("variants", "keras"):
            shutil.rmtree(out / name, ignore_errors=True)
        for pattern in ("*.tflite", "comparison.json", "report.md", "*.png"):
            for f in out.glob(pattern):
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "variants").mkdir(exist_ok=True)
    write_json_atomic(settings_path, settings)
    return out


def run(config: PruneQuantizeConfig) -> dict | None:
    # TensorFlow and Horovod load here, after the command line is read: --help, --version and a mistake in the
    # options answer without their start-up
    from distributed.model.kerasenv import hvd_keras, keras  # first: chooses tf_keras before TensorFlow loads
    from distributed.training.data import balanced_class_weights, label_weights, plan_data
    from distributed.training.hvd_utils import agree, configure_devices
    from optimize import compress

    hvd = hvd_keras()
    hvd.init()
    rank = hvd.rank()
    setup_logging(logging.WARNING if (config.quiet or rank) else logging.INFO)
    configure_devices(hvd.local_rank(), hvd.local_size())

    def check() -> str:
        run_model_path(config.run)
        for split in ("train", "val", "test"):
            schema.shard_paths(config.data, split)
        if not schema.read_manifest(config.data)["counts"]["per_split"].get("test", {}).get("total"):
            raise CxrError(f"{config.data} has no test split: variants are compared on it (prepare with "
                           "--test-fraction > 0)")
        return str(prepare_output(config))

    out = Path(agree(hvd, check))
    run_config = read_run_config(config.run)
    manifest = schema.read_manifest(config.data)
    base = keras.models.load_model(str(run_model_path(config.run)), compile=False)
    head = Head.of_model(base)
    if not head.binary and not head.multilabel:
        raise CxrError(f"optimize compares variants by binary metrics; {config.run} has a {head.describe()} head "
                       f"over {len(manifest['classes'])} classes")
    classes = list(manifest["classes"])
    variants = expand_variants(config.variants, config.sparsity)
    plan = plan_data(config.data, rank, hvd.size(), config.batch_size, run_config["config"]["model"])
    weighted = run_config["config"].get("class_weights") == "auto"
    if head.multilabel:  # the (negative, positive) weight of each label, as its training weighed them
        class_weight = label_weights(plan.class_counts, plan.label_known) if weighted else None
    else:
        class_weight = balanced_class_weights(plan.class_counts) if weighted else None
    rep_images, rep_ids = representative_images(Path(config.data), config.representative_samples, config.seed)
    representative = compress.representative_from(rep_images)
    # read once, and only if a pruned variant is built
    bn_images = functools.cache(
        lambda: np.stack(representative_images(Path(config.data), config.bn_samples, config.seed + 1)[0]))

    records: dict[str, dict] = {}
    for variant in variants:  # every rank walks the same list, so fine-tuning steps line up
        if agree(hvd, lambda v=variant: done_record(out, v)) is not None:
            continue
        started = time.perf_counter()
        facts: dict[str, Any] = {}
        try:
            if variant.fine_tuned:
                model, facts = build_fine_tuned(variant, base, config, hvd, plan, class_weight, bn_images)
            else:
                model = base
            float_ops = () if variant.family in ("qat", "prune-qat") else compress.FLOAT_OUTPUT_OPS
            data = compress.to_tflite(model, variant.tflite_kind, representative, float_ops=float_ops) \
                if rank == 0 else b""
        except compress.VariantSkipped as err:
            if rank == 0:
                log.warning("%s skipped: %s", variant.name, err)
                records[variant.name] = {"name": variant.name, "skipped": str(err)}
            continue
        if rank == 0:
            tflite = out / f"{variant.name}.tflite"
            write_bytes_atomic(tflite, data)
            if variant.fine_tuned:
                model.save(str(out / "keras" / variant.name))
            record = {"name": variant.name, "family": variant.family, "target_sparsity": variant.sparsity,
                      "tflite_kind": variant.tflite_kind, "file": tflite.name, "sha256": hashlib.sha256(data).hexdigest(),
                      "build_seconds": time.perf_counter() - started, **facts}
            write_json_atomic(out / "variants" / f"{variant.name}.json", record)
            log.info("%s built in %.0f s (%d bytes)", variant.name, record["build_seconds"], len(data))
        agree(hvd, lambda: None)  # the others wait while rank 0 converts
    if rank != 0:
        return None
    return compare(out, variants, records, config, classes, rep_ids, head)


def compare(out: Path, variants: list[Variant], skipped: dict[str, dict], config: PruneQuantizeConfig,
            classes: list[str], rep_ids: list[str], head: Head | None = None) -> dict:
    """Evaluate and measure every built variant (rank 0), then write comparison.json, report.md and plots."""
    rows = []
    base_record = done_record(out, Variant(BASELINE))
    baseline_probs = score_split(load_scorer(out / base_record["file"], head=head), config.data, "test",
                                 config.batch_size).probs \
        if base_record else None
    stamp = measurement_key(config)
    for variant in variants:
        if variant.name in skipped:
            rows.append(skipped[variant.name])
            continue
        record = done_record(out, variant)
        if record is None:
            continue
        if "test_auc" not in record or {k: record.get("measured", {}).get(k) for k in stamp} != stamp:
            # never report a figure measured with other latency settings or by other code than this run's
            log.info("evaluating and measuring %s", variant.name)
            quality = evaluate_variant(out / record["file"], config, classes, baseline_probs, head)
            record.update(quality, **measure_variant(out / record["file"], config),
                          measured={**stamp, "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
            write_json_atomic(out / "variants" / f"{variant.name}.json", record)
        else:
            log.info("%s: reusing the evaluation and latency measured at %s (same settings and code)",
                     variant.name, record["measured"]["at"])
        rows.append(record)
    base = next((r for r in rows if r["name"] == BASELINE and "test_auc" in r), None)
    for row in rows:
        if base and "test_auc" in row:
            row["gzip_ratio_vs_fp32"] = base["gzip_bytes"] / row["gzip_bytes"]
            row["size_ratio_vs_fp32"] = base["bytes"] / row["bytes"]
            row["test_auc_drop"] = base["test_auc"] - row["test_auc"]
            if "test_auc_per_finding" in row and "test_auc_per_finding" in base:  # a multi-label model's
                row["test_auc_drop_per_finding"] = {
                    f: (None if a is None or base["test_auc_per_finding"].get(f) is None
                        else base["test_auc_per_finding"][f] - a) for f, a in row["test_auc_per_finding"].items()}
            row["val_auc_drop"] = base["val_auc"] - row["val_auc"]
            row["speedup_1_thread"] = base["latency"]["1"]["median_ms"] / row["latency"]["1"]["median_ms"] \
                if "1" in row["latency"] and "1" in base["latency"] else None
    built = [r for r in rows if "test_auc" in r]
    best = measure.recommend(built, baseline=BASELINE, metric="val_auc", max_drop=config.max_auc_drop)
    comparison = {"run": str(config.run), "data": str(config.data), "max_auc_drop": config.max_auc_drop,
                  "threshold_rule": str(config.threshold), "representative": {"split": "train", "count": len(rep_ids),
                                                                           "ids": rep_ids},
                  "variants": rows, "recommended": best["name"] if best else None}
    write_json_atomic(out / "comparison.json", comparison)
    write_plots(out, built)
    write_text_atomic(out / "report.md", render_report(comparison, best))
    return comparison


def write_plots(out: Path, rows: list[dict]) -> None:
    if not rows:
        return
    for_plot = [{**r, "gzip_mb": r["gzip_bytes"] / 1e6, "latency_ms": r["latency"].get("1", {}).get("median_ms")}
                for r in rows]
    measure.tradeoff_plot(for_plot, out / "auc_vs_size.png", x="gzip_mb", y="test_auc", label="name",
                          xlabel="gzip-compressed model size (MB)", ylabel="test ROC-AUC",
                          title="AUC vs compressed size (Pareto front: best AUC for its size)", log_x=True)
    measure.tradeoff_plot(for_plot, out / "auc_vs_latency.png", x="latency_ms", y="test_auc", label="name",
                          xlabel="median latency per image, 1 thread, batch 1 (ms)", ylabel="test ROC-AUC",
                          title="AUC vs CPU latency (TFLite interpreter)")


def _f(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def render_report(c: dict, best: dict | None) -> str:
    head = ["variant", "size MB", "gzip MB", "gzip x smaller", "sparsity", "int8 share", "val AUC", "test AUC (95 % CI)",
            "test AUC drop", "accuracy", "sensitivity", "specificity", "latency 1T ms (p90)", "latency 2T ms (p90)",
            "memory MB", "measured"]
    lines = ["# Optimized variants", "", f"Run `{c['run']}`, data `{c['data']}`. Metrics at the threshold chosen on "
             f"validation ({c['threshold_rule']}); int8 calibration on {c['representative']['count']} train images.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in c["variants"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} |" + " |" * (len(head) - 2))
            continue
        if "test_auc" not in r:
            continue
        lat = {t: f"{v['median_ms']:.2f} ({v['p90_ms']:.2f})" for t, v in r["latency"].items()}
        ci = r["test_auc_ci"]
        lines.append("| " + " | ".join([
            r["name"], f"{r['bytes'] / 1e6:.2f}", f"{r['gzip_bytes'] / 1e6:.2f}", _f(r.get("gzip_ratio_vs_fp32"), ".1f"),
            f"{r['sparsity']:.2f}", f"{r['int8_fraction']:.2f}", _f(r["val_auc"], ".4f"),
            f"{r['test_auc']:.4f} ({_f(ci[0], '.3f')}-{_f(ci[1], '.3f')})", _f(r.get("test_auc_drop"), "+.4f"),
            _f(r["test_accuracy"], ".3f"), _f(r["test_sensitivity"], ".3f"), _f(r["test_specificity"], ".3f"),
            lat.get("1", ""), lat.get("2", ""), f"{r['peak_rss_delta_mb']:.1f}",
            f"{r['measured']['at']}, {r['measured']['code'][:12]}" if "measured" in r else ""]) + " |")
    per_finding = [r for r in c["variants"] if r.get("test_auc_per_finding")]
    if per_finding:  # a multi-label model: its AUC above is the macro AUC; here each finding's
        findings = list(per_finding[0]["test_auc_per_finding"])
        lines += ["", "Test ROC-AUC of each finding (its drop from fp32 in brackets; the AUC above is their "
                      "macro mean):", "", "| variant | " + " | ".join(findings) + " |", "|" + "---|" * (len(findings) + 1)]
        for r in per_finding:
            drops = r.get("test_auc_drop_per_finding") or {}
            lines.append("| " + " | ".join([r["name"], *[
                "too few to measure" if r["test_auc_per_finding"][f] is None
                else f"{r['test_auc_per_finding'][f]:.4f} ({_f(drops.get(f), '+.4f')})" for f in findings]]) + " |")
    lines += ["", "![AUC vs size](auc_vs_size.png)", "", "![AUC vs latency](auc_vs_latency.png)", ""]
    if best:
        lines.append(f"**Recommendation:** `{best['name']}`, the smallest variant (gzip {best['gzip_bytes'] / 1e6:.2f} MB, "
                     f"{_f(best.get('gzip_ratio_vs_fp32'), '.1f')}x smaller than fp32) whose validation AUC is within "
                     f"{c['max_auc_drop']} of the fp32 model's (chosen on validation, not test).")
    return "\n".join(lines) + "\n"


def comma_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers such as 0.5,0.8") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: sparsities must be in (0, 1)")
    return values


def variant_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown) or '(none)'}: choose from "
                                         f"{', '.join(VARIANTS)}")
    return names


def track_variants(config: PruneQuantizeConfig, comparison: dict) -> None:
    """With --tracking-uri: one child run per variant (its settings as params; size, latency, AUC with interval
    and the drops vs fp32 as metrics; the .tflite as artifact) under the training run's MLflow run, or under an
    "optimize RUN" run when the training was not tracked; the report and comparison on the parent."""
    if not config.tracking_uri:
        return
    out, run_dir = Path(config.output), Path(config.run)
    tags = tracking.common_tags("optimize", Path(config.data) / schema.MANIFEST)
    parent_id = tracking.recorded_run(run_dir, config.tracking_uri)
    parent = tracking.Tracker.start(config.tracking_uri, config.experiment, f"optimize {run_dir.name}", tags=tags,
                                    run_id=parent_id)
    if parent_id is None:
        parent.log_params({"run": str(run_dir), "data": str(config.data)})
    parent.set_tags({"optimize.recommended": comparison["recommended"],
                     "optimize.variants": len(comparison["variants"])})
    parent.log_artifacts([out / n for n in ("report.md", "comparison.json", "auc_vs_size.png", "auc_vs_latency.png")],
                         "optimized")
    for row in comparison["variants"] if parent.enabled else []:
        child = tracking.Tracker.start(config.tracking_uri, config.experiment, f"{run_dir.name}/{row['name']}",
                                       tags={**tags, "optimize.variant": row["name"]}, parent_run_id=parent.run_id)
        child.log_params({"variant": row["name"], **{k: row[k] for k in ("family", "target_sparsity", "tflite_kind",
                                                                          "file", "skipped") if k in row},
                          "threshold_rule": str(config.threshold), "latency_runs": config.latency_runs})
        ci = row.get("test_auc_ci") or [None, None]
        child.log_metrics({**{k: v for k, v in row.items() if k != "test_auc_ci"},
                           "test_auc_ci_low": ci[0], "test_auc_ci_high": ci[1]})
        child.log_artifacts([out / row["file"]] if row.get("file") else [], "model")
        child.end("FINISHED" if "test_auc" in row else "KILLED")
    parent.end("FINISHED")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m optimize.prune_quantize", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Writes OUTPUT/<variant>.tflite, variants/*.json, keras/<variant>/, "
                                            "comparison.json, report.md, auc_vs_size.png, auc_vs_latency.png. "
                                            "Example:\n  python -m optimize.prune_quantize --run runs/sample")
    parser.add_argument("--run", required=True, help="training run folder (runs/NAME)")
    parser.add_argument("--data", help="prepared dataset (default: the one the run was trained on)")
    parser.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default all)")
    parser.add_argument("--sparsity", type=comma_floats, default=[0.5, 0.8],
                        help="target sparsities of prune and prune-qat (default 0.5,0.8)")
    parser.add_argument("--fine-tune-epochs", type=int, default=2, help="epochs of pruning / QAT fine-tuning")
    parser.add_argument("--batch-size", type=int, default=32, help="per-worker batch for fine-tuning")
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate per worker (default 1e-4)")
    parser.add_argument("--representative-samples", type=int, default=256,
                        help="train images for int8 calibration (default 256)")
    parser.add_argument("--bn-samples", type=int, default=1024,
                        help="train images over which pruned models re-estimate their BatchNormalization statistics "
                             "(default 1024; 0: keep the fine-tuned statistics)")
    parser.add_argument("--threshold", type=parse_threshold, default=None,
                        help="operating point chosen on validation, as in distributed.evaluate: youden, robust, "
                             "sensitivity:X, specificity:X (default: the rule of the run's own evaluation, else "
                             "youden)")
    parser.add_argument("--max-auc-drop", type=float, default=0.01,
                        help="the recommendation's budget of validation-AUC loss vs fp32 (default 0.01)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the test AUC interval")
    parser.add_argument("--threads", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2],
                        help="interpreter thread counts to time (default 1,2)")
    parser.add_argument("--latency-runs", type=int, default=50, help="timed single-image runs (default 50)")
    parser.add_argument("--output", help="output folder (default RUN/optimized)")
    parser.add_argument("--overwrite", action="store_true", help="discard variants already in --output")
    parser.add_argument("--seed", type=int, default=0)
    tracking.add_arguments(parser, "every variant (child runs of the training run's MLflow run when it has one)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> PruneQuantizeConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bn_samples < 0:
        parser.error("--bn-samples must be >= 0")
    if args.fine_tune_epochs < 1 or args.representative_samples < 1 or args.batch_size < 1:
        parser.error("--fine-tune-epochs, --representative-samples and --batch-size must be >= 1")
    return config_from(PruneQuantizeConfig, args, output=args.output or str(Path(args.run) / "optimized"),
                       data=args.data or read_run_config(args.run)["config"]["data"],
                       threshold=args.threshold or evaluated_rule(Path(args.run)) or ThresholdRule("youden"))


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    comparison = run(config)
    if comparison:
        track_variants(config, comparison)
        print(render_report(comparison, None).split("\n\n![")[0])
        print(f"\nrecommended: {comparison['recommended']}; report: {Path(config.output) / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
