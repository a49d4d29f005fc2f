"""python -m preprocessing: radiographs -> patient-split, audited TFRecord shards with a manifest."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from preprocessing import audit, dicom, multilabel, transform
from preprocessing.pipeline import PrepareConfig, prepare
from preprocessing.split import OVERLAP_POLICIES, SPLIT_BY

log = logging.getLogger("cxrscale.preprocessing")

EXAMPLES = """examples:
  python -m preprocessing --input data/sample --output prepared/sample
  python -m preprocessing --input ~/chest_xray --output prepared/kermany --size 224 --resplit
  python -m preprocessing --input labels.csv --output prepared/site-a --contrast equalize --resize stretch
  python -m preprocessing --input /shared/cxr --output /shared/prepared/cxr --address auto

  python -m preprocessing --input Data_Entry_2017.csv --test-list test_list.txt --output prepared/nih14
  python -m preprocessing --input CheXpert-v1.0-small/train.csv --uncertain ones --output prepared/chexpert

inputs: a folder in the Kermany layout (train|val|test/CLASS/*), plain CLASS/* folders, or a CSV with
columns path,label[,patient][,split]; multi-label: NIH ChestX-ray14's Data_Entry_2017.csv, or a CSV with
path and one column per label valued 1, 0, -1 (uncertain) or blank, as CheXpert's (docs/multilabel.md).
JPEG, PNG (8/16-bit, grey/RGB/RGBA) and DICOM files (native, RLE, JPEG baseline/extended/lossless, JPEG-LS,
JPEG 2000: docs/dicom.md).
  python -m preprocessing --input pacs-export/ --output prepared/pacs --views PA,AP --modalities CR,DX
Re-running the same command resumes an interrupted run; other arguments need --overwrite."""


def _codes(option: str, vocabulary: frozenset[str]):
    def parse(text: str) -> tuple[str, ...]:
        try:
            return dicom.parse_codes(text, option, vocabulary)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    d = PrepareConfig("", "")
    p = OneLineParser(prog="python -m preprocessing", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of class folders, Kermany split folders, or a CSV file")
    p.add_argument("--output", required=True, help="folder to write, e.g. prepared/NAME")
    p.add_argument("--size", type=int, default=d.size, help="output side in pixels (default %(default)s)")
    p.add_argument("--contrast", choices=transform.CONTRAST_MODES, default=d.contrast,
                   help="contrast enhancement (default %(default)s; the thesis used equalize)")
    p.add_argument("--resize", choices=transform.RESIZE_MODES, default=d.resize,
                   help="stretch fills the square whatever the aspect ratio (default); letterbox keeps the ratio "
                        "and pads, which leaves each source's aspect ratio in the image for a model to learn "
                        "(in Kermany it differs by class: docs/preprocessing.md)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the pool carved out as validation when the input gives no val split")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help="share of the pool carved out as test when the input gives no test split")
    p.add_argument("--resplit", action="store_true",
                   help="pool the given train and val splits and carve val again (Kermany's val has 16 images)")
    p.add_argument("--split-by", choices=SPLIT_BY, default=d.split_by,
                   help="how the test split is held out when the input gives none: patient (default: patients at "
                        "random), time (the latest --test-fraction by acquisition time: a CSV time column or the "
                        "DICOM dates; temporal validation) or source (whole sources: a CSV source column or the "
                        "folder below each class folder; external validation). Validation stays a random "
                        "patient-grouped carve of the rest")
    p.add_argument("--test-sources", type=lambda text: tuple(s.strip() for s in text.split(",") if s.strip()),
                   default=d.test_sources, metavar="A,B",
                   help="--split-by source: the sources to hold out (default: whole sources at random up to "
                        "--test-fraction)")
    p.add_argument("--given-overlap", choices=OVERLAP_POLICIES, default=d.given_overlap,
                   help="pool images sharing a patient or duplicate group with a given val/test split: exclude "
                        "them from train and val (default), or keep them in train (a leak, flagged in the "
                        "manifest); a given split always holds exactly its given images")
    p.add_argument("--test-list", default=d.test_list, metavar="FILE",
                   help="a file naming the images of a given test split, one file name (or input path) per line, "
                        "kept exactly as given: NIH's test_list.txt")
    p.add_argument("--labels", type=lambda text: tuple(s.strip() for s in text.split(",") if s.strip()),
                   default=d.labels, metavar="A,B",
                   help="multi-label CSV: the labels to keep, in this order (default: every label it has)")
    p.add_argument("--uncertain", choices=multilabel.UNCERTAIN_POLICIES, default=d.uncertain,
                   help="multi-label CSV: what an uncertain label (-1, CheXpert) becomes: ignore (masked out of the "
                        "loss and the metrics; default), ones (positive) or zeros (negative)")
    p.add_argument("--blank", choices=multilabel.BLANK_POLICIES, default=d.blank,
                   help="multi-label CSV with a column per label: what a blank label (not mentioned, CheXpert) "
                        "becomes: negative (default, as CheXpert's labeller means it) or ignore (masked out, as "
                        "TorchXRayVision reads it)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="parallel Ray tasks (default: all CPUs of the local machine or cluster); 1 without "
                        "--address runs in this process, without Ray")
    p.add_argument("--address", default=d.address,
                   help="Ray cluster to use ('auto' for the running one); default: a private local Ray")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split and shard order")
    p.add_argument("--min-side", type=int, default=d.min_side, help="reject images with a shorter side (px)")
    p.add_argument("--clahe-clip-limit", type=float, default=d.clahe_clip_limit)
    p.add_argument("--clahe-tile-grid", type=int, default=d.clahe_tile_grid)
    p.add_argument("--near-duplicate-distance", type=int, default=d.near_duplicate_distance,
                   help=f"max Hamming distance of {audit.HASH_BITS}-bit perceptual hashes for near duplicates "
                        "(-1 turns the search off; default %(default)s)")
    p.add_argument("--modalities", type=_codes("--modalities", dicom.MODALITY_TERMS), default=d.modalities,
                   help="DICOM Modality codes accepted, comma-separated, or 'any' (default %(default)s: computed and "
                        "digital radiography); other DICOMs are rejected with the reason")
    p.add_argument("--views", type=_codes("--views", dicom.VIEW_TERMS | {dicom.UNKNOWN_VIEW}), default=d.views,
                   help="DICOM ViewPosition codes accepted, e.g. PA,AP (UNKNOWN: none given); default: every view. "
                        "Each image's view is recorded in split.csv and counted in audit.json either way")
    p.add_argument("--body-parts", type=_codes("--body-parts", None), default=d.body_parts,
                   help="DICOM BodyPartExamined codes accepted, comma-separated, or 'any' (default %(default)s: "
                        "UNKNOWN is a DICOM without the element); other DICOMs are rejected with the reason")
    p.add_argument("--allow-burned-in-annotation", action="store_true",
                   help="accept DICOMs whose BurnedInAnnotation is YES (rejected by default: text burnt into the "
                        "pixels can identify the patient)")
    p.add_argument("--shards", type=int, default=d.shards,
                   help="shards per split (default: 16 when each gets >= 32 records, more for huge splits)")
    p.add_argument("--salt-file", default=d.salt_file,
                   help="file of >= 16 secret bytes for the id/patient hashes, to get the same hashes in "
                        "separate runs (default: a random salt per run, discarded at the end)")
    p.add_argument("--redact-paths", action="store_true",
                   help="name rejected and duplicate inputs by hash, not by path, in manifest.json and audit.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a prepared dataset made with other arguments in --output")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    options = {k: v for k, v in vars(args).items() if k != "quiet"}
    manifest = prepare(PrepareConfig(**options))
    counts = manifest["counts"]
    print(f"prepared {counts['written']} images ({counts['rejected']} rejected, {counts['excluded']} excluded, "
          f"of {counts['inputs']} inputs) in {Path(args.output)}")
    classes, per_split = manifest["classes"], counts["per_split"]
    if manifest.get("task") == "multi-label":  # a label per row: positive images per split
        width = max(len(c) for c in classes) + 2
        print(f"  {'positive images':<{width}}" + "".join(f"{split:>9}" for split in per_split))
        for c in classes:
            print(f"  {c:<{width}}" + "".join(f"{row[c]:>9}" for row in per_split.values()))
        print(f"  {'images':<{width}}" + "".join(f"{row['total']:>9}" for row in per_split.values()))
    else:
        print(f"  {'split':<6}" + "".join(f"{c:>12}" for c in classes) + f"{'total':>8}")
        for split, row in per_split.items():
            print(f"  {split:<6}" + "".join(f"{row[c]:>12}" for c in classes) + f"{row['total']:>8}")
    audit_counts = manifest["audit"]
    print(f"  duplicates: {audit_counts['exact_duplicate_groups']} exact, {audit_counts['near_duplicate_groups']} "
          f"near (kept within one split); details in {Path(args.output) / 'audit.json'}")
    if counts["excluded"]:
        print(f"  excluded {counts['excluded']} pool images that share a patient or duplicate group with a given "
              "split (listed in manifest.json)")
    for warning in manifest["warnings"]:
        print(f"  warning: {warning}")
    for entry in manifest["rejected"][:10]:
        print(f"  rejected {entry['input']}: {entry['reason']}")
    if len(manifest["rejected"]) > 10:
        print(f"  ... {len(manifest['rejected']) - 10} more rejected inputs listed in manifest.json")
    return 0


if __name__ == "__main__":
    run_cli(main)
