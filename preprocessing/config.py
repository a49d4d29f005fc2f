"""`PrepareConfig`: every option of `python -m preprocessing`, checked, and which of them define the output."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cxrscale.errors import CxrError
from preprocessing import audit, dicom, multilabel, split as splitting
from preprocessing.transform import TransformParams


@dataclass(frozen=True)
class PrepareConfig:
    """Every option of `python -m preprocessing`, one field per flag."""

    input: str
    output: str
    size: int = 224
    contrast: str = "clahe"
    resize: str = "stretch"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    resplit: bool = False
    split_by: str = "patient"
    test_sources: tuple[str, ...] = ()
    given_overlap: str = "exclude"
    test_list: str | None = None
    labels: tuple[str, ...] = ()
    uncertain: str = "ignore"
    blank: str = "negative"
    workers: int | None = None
    address: str | None = None
    seed: int = 0
    min_side: int = 64
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    near_duplicate_distance: int = audit.DEFAULT_NEAR_DISTANCE
    modalities: tuple[str, ...] = dicom.RADIOGRAPHY_MODALITIES
    views: tuple[str, ...] = ()
    allow_burned_in_annotation: bool = False
    body_parts: tuple[str, ...] = dicom.CHEST_BODY_PARTS
    shards: int | None = None
    salt_file: str | None = None
    redact_paths: bool = False
    overwrite: bool = False

    def transform_params(self) -> TransformParams:
        try:
            return TransformParams(size=self.size, resize=self.resize, contrast=self.contrast,
                                   clahe_clip_limit=self.clahe_clip_limit, clahe_tile_grid=self.clahe_tile_grid,
                                   min_side=self.min_side, modalities=self.modalities, views=self.views,
                                   allow_burned_in_annotation=self.allow_burned_in_annotation,
                                   body_parts=self.body_parts)
        except ValueError as err:
            raise CxrError(str(err)) from None

    def validate(self) -> None:
        for name, value in (("--val-fraction", self.val_fraction), ("--test-fraction", self.test_fraction)):
            if not 0 <= value < 1:
                raise CxrError(f"{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1:
            raise CxrError("--val-fraction + --test-fraction must leave something to train on (sum < 1)")
        if self.workers is not None and self.workers < 1:
            raise CxrError(f"--workers must be at least 1, got {self.workers}")
        if self.split_by not in splitting.SPLIT_BY:
            raise CxrError(f"--split-by must be one of {', '.join(splitting.SPLIT_BY)}, got {self.split_by!r}")
        if self.test_sources and self.split_by != "source":
            raise CxrError("--test-sources names the sources --split-by source holds out; add --split-by source")
        if self.given_overlap not in splitting.OVERLAP_POLICIES:
            raise CxrError(f"--given-overlap must be one of {', '.join(splitting.OVERLAP_POLICIES)}, "
                           f"got {self.given_overlap!r}")
        if self.uncertain not in multilabel.UNCERTAIN_POLICIES:
            raise CxrError(f"--uncertain must be one of {', '.join(multilabel.UNCERTAIN_POLICIES)}, "
                           f"got {self.uncertain!r}")
        if self.blank not in multilabel.BLANK_POLICIES:
            raise CxrError(f"--blank must be one of {', '.join(multilabel.BLANK_POLICIES)}, got {self.blank!r}")
        if self.shards is not None and self.shards < 1:
            raise CxrError(f"--shards must be at least 1, got {self.shards}")
        self.transform_params()

    def output_defining(self) -> dict[str, Any]:
        """The options that decide the output's content (not how fast or where it runs)."""
        skip = {"input", "output", "workers", "address", "overwrite", "salt_file"}
        # the multi-label options only when set: a dataset prepared before they existed keeps its fingerprint,
        # so the same command still finds it done (or resumes it) instead of asking for --overwrite
        defaults = {"test_list": None, "labels": (), "uncertain": "ignore", "blank": "negative"}
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in skip and not (k in defaults and v == defaults[k])}
