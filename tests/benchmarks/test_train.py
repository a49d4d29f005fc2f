"""benchmarks.train: what its summary decides met / NOT MET, from hand-made results."""
from __future__ import annotations

import pytest

from benchmarks.train import main, summarise
from cxrscale.errors import CxrError


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


def test_ratios_are_the_median_of_side_by_side_runs_not_the_ratio_of_medians():
    # the machine drifts: the third repeat ran in a slow spell for plain and a slower one for np1. The median of
    # the paired ratios (0.99) is what the toolkit costs; the ratio of the medians (13.0 / 14 = 0.929) is not
    res = results(14.0, 13.0, 12.0)
    for run, found in zip(res["runs"], ([10.0, 20.0, 14.0], [9.9, 19.8, 13.0], [9.5, 18.0, 12.0])):
        run["repeat_rates"] = found
    res["repeats"] = 3
    checks, md = summarise(res)
    assert checks[0]["measured"] == pytest.approx(0.99) and checks[0]["status"] == "met"
    assert checks[0]["name"].endswith("3 side-by-side runs, 0.929-0.990")
    assert checks[1]["measured"] == pytest.approx(12.0 / 13.0) and "run 3 times side by side" in md
    assert "9.9, 19.8, 13.0" in md


def test_fewer_than_one_repeat_is_refused_by_name(tmp_path):
    with pytest.raises(CxrError, match="--repeats must be at least 1, got 0"):
        main(["--repeats", "0", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
