"""Built-in synthetic sample: small, deterministic, labelled radiograph-like images.

The sample lets ``make demo`` and fast tests run anywhere without the real
Kermany chest X-ray data. It is **synthetic**: every image is drawn from simple
analytic shapes (body outline, lung fields, heart, spine, ribs, clavicles) plus
noise, PNEUMONIA images additionally get blurred consolidation-like patches.
It must never be presented as real data, so every output folder carries a
``README.txt`` saying so, a ``SAMPLE.json`` marker, and every JPEG carries a
COM (comment) segment and a small burned-in "SYNTHETIC" label.

Layout written (Kermany folder layout and file naming)::

    OUT/README.txt
    OUT/SAMPLE.json                       # written last; marks a complete sample
    OUT/train/NORMAL/IM-0003-0001.jpeg    # also NORMAL2-IM-..., IM-....-0001-0002
    OUT/train/PNEUMONIA/person7_bacteria_12.jpeg
    OUT/test/...                          # only with splits=("train", "test")

Determinism: image ``i`` of class ``c`` in split ``s`` is rendered from
``numpy.random.default_rng([seed, 0, s, c, i])`` so its pixels do not depend on
how many other images are requested, and JPEGs are encoded with fixed settings,
so two runs with the same parameters produce byte-identical files.

The multi-label sample (``--findings``) renders Cardiomegaly, Consolidation,
Effusion and Pneumothorax into the images, several per image, and writes
``OUT/images/NNNNN.jpeg`` and ``OUT/labels.csv`` (path, patient, a 0/1 column
per finding) for ``python -m preprocessing`` to read as a multi-label CSV.

CLI::

    python -m preprocessing.sample --output data/sample [--normal 60]
        [--pneumonia 180] [--size 256] [--seed 0] [--with-test] [--aspect-jitter]
    python -m preprocessing.sample --findings --output data/sample-findings [--images 800]
"""

from __future__ import annotations

from preprocessing.sample.cli import build_parser, main
from preprocessing.sample.folder import (FINDINGS_CSV, MARKER_NAME, MIN_SIZE, README_NAME, README_SIGNATURE,
                                         SampleError, generate_findings_sample, generate_sample)
from preprocessing.sample.plan import CLASSES, PlannedImage, image_rng, plan_sample, render_planned, split_counts
from preprocessing.sample.render import FINDINGS, encode_jpeg, render_findings, render_radiograph

__all__ = ["CLASSES", "FINDINGS", "FINDINGS_CSV", "MARKER_NAME", "MIN_SIZE", "PlannedImage", "README_NAME",
           "README_SIGNATURE", "SampleError", "build_parser", "encode_jpeg", "generate_findings_sample",
           "generate_sample", "image_rng", "main", "plan_sample", "render_planned",
           "render_findings", "render_radiograph", "split_counts"]
