"""python -m benchmarks: run the benchmark suites and write one report.

    python -m benchmarks --suite all --quick          # what `make bench` runs, about 25 minutes on 2 cores
    python -m benchmarks --suite scaling,complexity --full --out /tmp/bench

Writes OUT/results.json (every raw figure, the machine, library versions, the git commit), OUT/report.md and
a self-contained OUT/report.html with the plots, under benchmarks/results/<timestamp>/ by default. The
report opens with a summary page answering the thesis's question (VGG16 vs ResNet50 vs the CNN) from the
latest real-data runs and these measurements. A suite that fails is reported as failed, with its error, and
the others still run.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import (BENCH_PACKAGES, DEFAULT_RESULTS, REPO, SUITES, checks_table, comma_list, load_suite,
                               machine, markdown_table, model_setups, stamp)
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from cxrscale.files import write_json_atomic, write_text_atomic
from cxrscale.provenance import git_commit, library_versions

# The toolkit's TensorFlow-heavy modules are imported inside the functions that use them, not here: a
# suite's driver process times and measures its children, and must not carry TensorFlow itself.
log = logging.getLogger("cxrscale.benchmarks")


def run_suites(names: Sequence[str], quick: bool, out: Path, work: Path) -> dict[str, dict]:
    """Each suite's raw results, checks, Markdown and plots, or its error; one failing does not stop the rest."""
    done: dict[str, dict] = {}
    for i, name in enumerate(names, start=1):
        log.info("[%d/%d] suite %s (%s)", i, len(names), name, "quick" if quick else "full")
        started = time.perf_counter()
        try:
            module = load_suite(name)
            raw = module.run_suite(quick, work)
            checks, markdown = module.summarise(raw)
            plots = [p.name for p in module.plots(raw, out)] if hasattr(module, "plots") else []
            done[name] = {"status": "ok", "results": raw, "checks": checks, "markdown": markdown, "plots": plots}
        except Exception as err:  # a suite's failure is reported, never fatal to the others
            log.error("suite %s failed: %s", name, err)
            done[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                          "traceback": traceback.format_exc(limit=8)}
        done[name]["seconds"] = time.perf_counter() - started
        log.info("suite %s %s in %.0f s", name, done[name]["status"], done[name]["seconds"])
    return done


# --- the summary page -----------------------------------------------------------------------------------

def latest_by_model(pattern: str, model_of) -> dict[str, tuple[Path, dict]]:
    """{model: (file, content)} of the newest JSON file per model among REPO/runs/<pattern>; model_of returns
    None for files to leave out."""
    found: dict[str, tuple[Path, dict]] = {}
    for path in sorted((REPO / "runs").glob(pattern), key=lambda p: p.stat().st_mtime):
        try:
            content = json.loads(path.read_text())
            model = model_of(path, content)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if model:
            found[model] = (path, content)
    return found


def _real(source: dict | None) -> bool:
    """False for the built-in synthetic sample (its folder holds the sample's marker file)."""
    from preprocessing.sample import MARKER_NAME

    return MARKER_NAME not in (source or {}).get("ignored", [])


def _eval_model(path: Path, metrics: dict) -> str | None:
    return (metrics.get("run") or {}).get("model") if _real(metrics["data"].get("source")) else None


def _optimized_model(path: Path, comparison: dict) -> str | None:
    run_dir, data = (Path(comparison[k]) if Path(comparison[k]).is_absolute() else REPO / comparison[k]
                     for k in ("run", "data"))
    if not _real(json.loads((data / "manifest.json").read_text()).get("source")):
        return None
    return json.loads((run_dir / "config.json").read_text())["config"]["model"]


def summary(suites: dict[str, dict]) -> str:
    """VGG16 vs ResNet50 vs the CNN in accuracy, throughput, memory and size after optimization."""
    evals = latest_by_model("*/eval/metrics.json", _eval_model)
    optimized = latest_by_model("**/comparison.json", _optimized_model)
    throughput: dict[str, float] = {}
    params: dict[str, int] = {}
    build = {r["model"]: r for r in (suites.get("complexity", {}).get("results") or {}).get("model_build", [])}
    params.update({m: r["parameters"] for m, r in build.items()})
    # this invocation's train suite first; models it did not run (--quick runs the CNN only) from the last full one
    for train in (_latest_result("train"), suites.get("train", {}).get("results")):
        for row in (train or {}).get("runs", []):
            if row["mode"] == "np1" and row["precision"] == "fp32":
                throughput[row["model"]] = row["images_per_second"]
        params.update({m: f["parameters"] for m, f in (train or {}).get("flops", {}).items() if f.get("parameters")})
    rows = []
    for model in model_setups():
        path, ev = evals.get(model, (None, None))
        acc = ""
        if ev and "at_threshold" in ev:
            at = ev["at_threshold"]
            auc = at["intervals"]["roc_auc"]
            acc = (f"acc {at['accuracy']:.3f}, AUC {auc['value']:.3f} ({auc['low']:.3f}-{auc['high']:.3f}), "
                   f"n={ev['n']} at {ev['model']['input_shape'][0]} px ({path.parent.parent.name})")
        opt = ""
        if model in optimized:
            comparison = optimized[model][1]
            best = next((r for r in comparison["variants"] if r["name"] == comparison.get("recommended")), None)
            if best:
                opt = (f"{best['name']}: {best['gzip_bytes'] / 1e6:.2f} MB gzip ({best.get('gzip_ratio_vs_fp32', 0):.1f}x "
                       f"smaller), AUC drop {best.get('test_auc_drop', 0):+.3f}")
        memory = build.get(model, {}).get("rss_delta_mb")
        rows.append([model, f"{params[model] / 1e6:.1f} M" if params.get(model) else "", acc or "no real-data run",
                     f"{throughput[model]:.1f}" if model in throughput else "",
                     f"{memory:.0f}" if memory else "", opt or "not optimized yet"])
    return ("## Summary: VGG16 vs ResNet50 vs the thesis CNN\n\n"
            "Accuracy from the newest evaluated real-data run of each model under `runs/` (not the synthetic "
            "sample; test split, threshold "
            "chosen on validation, 95 % bootstrap CI); training throughput from the train suite (one Horovod worker, "
            "fp32, this machine's CPU; models a --quick run skips come from the newest earlier train results); model memory from the complexity suite; size after optimization from the "
            "newest `optimize.prune_quantize` comparison (the recommended variant).\n\n"
            + markdown_table(["model", "parameters", "accuracy (real data)", "train images/s", "build memory MB",
                              "after optimization"], rows))


def _latest_result(suite: str) -> dict | None:
    files = sorted(DEFAULT_RESULTS.glob(f"{suite}-*.json"))
    return json.loads(files[-1].read_text()) if files else None


# --- the report -----------------------------------------------------------------------------------------

def render(suites: dict[str, dict], header: str) -> str:
    parts = [header, summary(suites)]
    for name, s in suites.items():
        if s["status"] == "ok":
            figures = "\n\n".join(f"![{p}]({p})" for p in s["plots"])
            parts.append(f"## Suite: {name} ({s['seconds']:.0f} s)\n\n{s['markdown']}\n\n{figures}".rstrip())
        else:
            parts.append(f"## Suite: {name}: FAILED after {s['seconds']:.0f} s\n\n```\n{s['error']}\n```")
    checks = [{**c, "name": f"{name}: {c['name']}"} for name, s in suites.items() if s["status"] == "ok"
              for c in s["checks"]]
    parts.append("## All targets\n\n" + checks_table(checks))
    return "\n\n".join(parts) + "\n"


def to_html(markdown_text: str, folder: Path) -> str:
    """The Markdown report as one HTML file, images embedded as data URIs."""
    import markdown

    from cxrscale.figures import png_data_uri

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    body = re.sub(r'src="([^":]+\.png)"', lambda m: f'src="{png_data_uri(folder / m.group(1))}"', body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>cxrscale benchmarks</title>'
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python -m benchmarks --suite all --quick\n"
                                       "  python -m benchmarks --suite scaling --full")
    p.add_argument("--suite", default="all", help=f"all, or a comma list of {', '.join(SUITES)}")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small inputs, about 25 minutes for all (default)")
    size.add_argument("--full", action="store_true", help="the full measurements (hours on 2 cores)")
    p.add_argument("--out", type=Path, help="report folder (default benchmarks/results/<timestamp>/)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench",
                   help="scratch folder for datasets and runs the suites make (reused across invocations)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = list(SUITES) if args.suite == "all" else comma_list(args.suite, "--suite", SUITES)
    if not names:
        parser.error(f"--suite: none given; choose all or from {', '.join(SUITES)}")
    setup_logging()
    quick = not args.full
    out = args.out or DEFAULT_RESULTS / stamp()
    out.mkdir(parents=True, exist_ok=True)
    suites = run_suites(names, quick, out, args.work)
    meta: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "mode": "quick" if quick else "full",
                            "machine": machine(), "versions": library_versions(BENCH_PACKAGES),
                            "git_commit": git_commit()}
    write_json_atomic(out / "results.json", {**meta, "suites": {
        n: {k: v for k, v in s.items() if k != "markdown"} for n, s in suites.items()}})
    m = meta["machine"]
    header = (f"# cxrscale benchmarks ({meta['mode']})\n\n{meta['created']}, commit {meta['git_commit']}, "
              f"{m.get('cpu_model', m['processor'])}, {m['cpus']} CPUs, {m['memory_gib']} GiB; "
              + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    text = render(suites, header)
    write_text_atomic(out / "report.md", text)
    write_text_atomic(out / "report.html", to_html(text, out))
    failed = [n for n, s in suites.items() if s["status"] != "ok"]
    print(f"report: {out / 'report.html'}" + (f"; FAILED suites: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
