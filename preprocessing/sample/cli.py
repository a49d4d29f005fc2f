"""python -m preprocessing.sample: the command line of the synthetic sample."""
from __future__ import annotations

import argparse
from typing import Sequence

from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, int_at_least
from preprocessing.sample.folder import MIN_SIZE, SampleError, generate_findings_sample, generate_sample


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m preprocessing.sample",
        description="Write the built-in SYNTHETIC chest X-ray sample (Kermany folder "
                    "layout, NORMAL/PNEUMONIA), or with --findings the multi-label sample (images/ and "
                    "labels.csv with Cardiomegaly, Consolidation, Effusion, Pneumothorax rendered into the "
                    "images). Not real radiographs: for demos and tests.",
        epilog="examples:\n  python -m preprocessing.sample --output data/sample --with-test\n"
               "  python -m preprocessing.sample --findings --output data/sample-findings --images 800",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="data/sample",
                   help="output folder (new, empty, or a previous sample; default: %(default)s)")
    p.add_argument("--normal", type=int_at_least(0), default=60,
                   help="NORMAL images in train (default: %(default)s)")
    p.add_argument("--pneumonia", type=int_at_least(0), default=180,
                   help="PNEUMONIA images in train (default: %(default)s)")
    p.add_argument("--size", type=int_at_least(MIN_SIZE), default=256,
                   help=f"image side in pixels, >= {MIN_SIZE} (default: %(default)s)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="random seed, >= 0 (default: %(default)s)")
    p.add_argument("--with-test", action="store_true",
                   help="also write a small test/ split (~20%% of the train counts)")
    p.add_argument("--aspect-jitter", action="store_true",
                   help="vary width/height in [0.8, 1.25] (longer side = --size)")
    p.add_argument("--findings", action="store_true",
                   help="the multi-label sample: findings rendered into the images, labels.csv beside them")
    p.add_argument("--images", type=int_at_least(1), default=800,
                   help="--findings: images to write, two per patient (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.findings:
        try:
            counts = generate_findings_sample(args.output, args.images, args.size, args.seed)
        except SampleError as exc:
            raise CxrError(f"--output: {exc}") from None
        shown = ", ".join(f"{name} {n}" for name, n in counts.items() if name != "images")
        print(f"synthetic multi-label sample (not real radiographs) in {args.output}: {counts['images']} images; "
              f"positive: {shown}; labels in labels.csv")
        return 0
    splits = ("train", "test") if args.with_test else ("train",)
    try:
        counts = generate_sample(args.output, args.normal, args.pneumonia, args.size,
                                 args.seed, splits, aspect_jitter=args.aspect_jitter)
    except SampleError as exc:
        raise CxrError(f"--output: {exc}") from None
    parts = "; ".join(f"{s} NORMAL={c['NORMAL']} PNEUMONIA={c['PNEUMONIA']}"
                      for s, c in counts.items())
    print(f"synthetic sample (not real radiographs) in {args.output}: {parts}")
    return 0
