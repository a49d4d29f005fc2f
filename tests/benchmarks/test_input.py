"""benchmarks.input: the met / NOT MET decisions, and one real pinned measurement of the training pipeline."""
from __future__ import annotations

import pytest

from benchmarks import input as bench
from tests.training_fixtures import prepared64, sample_images  # noqa: F401 (fixtures)


def results(rate_1core_224_aug: float, rate_2core_224_aug: float) -> dict:
    runs = []
    for size in bench.SIZES:
        for augment in (False, True):
            for cores in (1, 2):
                rate = 10_000.0 * cores if not augment else (
                    (rate_1core_224_aug if cores == 1 else rate_2core_224_aug) if size == 224 else 2_000.0 * cores)
                runs.append({"size": size, "augment": augment, "cores": cores, "images_per_second": rate,
                             "images_per_second_per_core": rate / cores})
    return {"images": 400, "batch": 32, "seconds_per_measurement": 8.0, "runs": runs}


@pytest.mark.parametrize("one, two, statuses", [(650.0, 1300.0, ["met", "met"]), (599.0, 1300.0, ["NOT MET", "met"]),
                                                (500.0, 900.0, ["NOT MET", "NOT MET"])])
def test_summarise_decides_met_and_not_met(one, two, statuses):
    checks, md = bench.summarise(results(one, two))
    assert [c["status"] for c in checks] == statuses
    assert checks[0]["measured"] == one
    assert checks[1]["measured"] == pytest.approx(2375 / max(one, two / 2))
    assert "A100 AMP | 2,375 |" in md and f"{2375 / max(one, two / 2):.1f}" in md


def test_a_pinned_measurement_of_the_real_pipeline(prepared64):
    row = bench.measure_one(prepared64, 64, True, 1, batch=8, seconds=1.0)
    assert row["cores"] == 1 and len(row["cpus"].split(",")) == 1
    assert row["images"] >= 8 and row["images_per_second"] > 0
    assert row["images_per_second_per_core"] == row["images_per_second"]
