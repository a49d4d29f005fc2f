"""benchmarks.train: what its summary decides met / NOT MET, from hand-made results."""
from __future__ import annotations

import pytest

from benchmarks.train import summarise


def results(plain: float, np1: float, np2: float, cache: dict | None = None) -> dict:
    flops = {"cnn": {"forward_flops": 1e9, "head_forward_flops": 0.0, "matmul_flops_per_second": 5e10,
                     "parameters": 400_000}}
    runs = [{"model": "cnn", "image_size": 150, "precision": "fp32", "mode": mode, "images_per_second": rate,
             "achieved_gflops": rate * 3, "fraction_of_matmul": rate * 3e9 / 5e10}
            for mode, rate in (("plain", plain), ("np1", np1), ("np2", np2))]
    return {"models": ["cnn"], "precisions": ["fp32"], "images": 96, "epochs": 3, "cores": 2,
            "batch_size_per_worker": 16, "flops": flops, "runs": runs, "cache_features_epoch_seconds": cache or {}}


@pytest.mark.parametrize("plain, np1, np2, statuses", [(10.0, 9.8, 9.5, ["met", "met"]),
                                                       (10.0, 9.6, 9.5, ["NOT MET", "met"]),
                                                       (10.0, 10.2, 8.0, ["met", "NOT MET"])])
def test_one_worker_overhead_and_two_worker_efficiency(plain, np1, np2, statuses):
    checks, md = summarise(results(plain, np1, np2))
    assert [c["status"] for c in checks] == statuses
    assert checks[0]["name"].startswith("np1 (toolkit, no allreduce) / plain fit")
    assert checks[0]["measured"] == pytest.approx(np1 / plain) and checks[1]["measured"] == pytest.approx(np2 / np1)


@pytest.mark.parametrize("feature_pass, status", [(5.0, "met"), (40.0, "NOT MET")])
def test_cache_features_speedup_counts_the_feature_pass(feature_pass, status):
    cache = {"uncached": 20.0, "cached": 0.2, "uncached_all_epochs": 62.0, "cached_all_epochs": 0.7,
             "feature_pass": feature_pass}
    checks, md = summarise(results(10.0, 9.9, 9.5, cache))
    speedup = checks[-1]
    assert speedup["measured"] == pytest.approx(62.0 / (feature_pass + 0.7)) and speedup["status"] == status
    assert "leaving out the feature pass" in md and f"{feature_pass:.1f} s" in md
