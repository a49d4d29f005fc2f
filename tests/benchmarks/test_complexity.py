"""benchmarks.complexity: the log-log fit, the summary's statuses and numbers, the plot, one real child."""
from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.common import run_child
from benchmarks.complexity import CLAIMS, add_fits, fit_loglog, plots, run_suite, summarise
from cxrscale.errors import CxrError

X = [60, 120, 240, 480, 960]


@pytest.mark.parametrize("coef, exponent", [(3.0, 1.0), (1.0, 2.0), (2.0, 0.0), (0.5, 0.5)])
def test_fit_loglog_recovers_exact_power_laws(coef, exponent):
    fit = fit_loglog(X, [coef * x ** exponent for x in X])
    assert fit["slope"] == pytest.approx(exponent, abs=1e-9)
    assert fit["intercept"] == pytest.approx(math.log(coef), abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0)


def test_fit_loglog_on_noisy_timings():
    rng = np.random.default_rng(0)
    x = np.geomspace(100, 10_000, 12)
    linear = fit_loglog(x, 3 * x * rng.lognormal(0, 0.05, x.size))
    assert linear["slope"] == pytest.approx(1.0, abs=0.05) and linear["r2"] > 0.99
    flat = fit_loglog(x, 2 * rng.lognormal(0, 0.05, x.size))  # constant plus noise: no trend to explain
    assert abs(flat["slope"]) < 0.05 and flat["r2"] < 0.5


def hand_made() -> dict:
    """Raw results with known exponents: ours' memory flat, thesis' linear, epoch time x^0.5 (off target)."""
    n = [100, 200, 400, 800]
    prep = [{"variant": v, "images": x, "seconds": 0.01 * x, "peak_rss_mb": 150.0 if v != "thesis" else 50 + 0.2 * x,
             "marginal_rss_mb": 0.2 * x if v == "thesis" else None} for x in n for v in ("thesis", "cxrscale-2")]
    return add_fits({"quick": True, "n": 100, "epochs": 2, "repeats": 1, "preprocess": prep,
                     "epoch": [{"images": x, "epoch_seconds": 0.1 * x ** 0.5, "first_epoch_seconds": 5.0} for x in n],
                     "batch": [{"batch_size": b, "baseline_rss_mb": 600.0, "peak_rss_mb": 600 + 20.0 * b,
                                "marginal_rss_mb": 20.0 * b} for b in (8, 16, 32, 64)],
                     "model_build": [{"model": m, "parameters": p, "build_seconds": p / 1e7,
                                      "rss_delta_mb": 4 * p / 2**20, "peak_rss_mb": 700.0}
                                     for m, p in (("cnn", 404_033), ("vgg16", 40_407_874))]})


def test_summarise_statuses_and_table_numbers():
    results = hand_made()
    checks, md = summarise(results)
    status = {c["name"]: c["status"] for c in checks}
    assert status == {"our driver memory exponent": "met", "epoch time exponent: distance from 1": "NOT MET",
                      "our preprocessing time exponent: distance from 1": "met"}
    assert {c["name"]: c["measured"] for c in checks}["epoch time exponent: distance from 1"] == pytest.approx(0.5)
    whats = {c[1] for c in CLAIMS.values()}
    row = {cells[2].strip(): cells for cells in (line.split("|") for line in md.splitlines())
           if len(cells) == 9 and cells[2].strip() in whats}
    assert len(row) == len(CLAIMS)
    for key, (panel, what, _, expected, *_rest) in CLAIMS.items():
        assert row[what][1].strip() == panel and float(row[what][4]) == expected
        assert float(row[what][5]) == pytest.approx(results["fits"][key]["slope"], abs=0.005)
    assert float(row["CNN 64 px, 1 worker"][5]) == 0.5 and float(row["cxrscale driver, peak RSS"][5]) == 0
    assert "| 40,407,874 |" in md and "| 800 | 5.00 | 2.83 |" in md


def test_plots_write_one_png(tmp_path):
    [path] = plots(hand_made(), tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_missing_shared_data_names_the_folder(tmp_path):
    with pytest.raises(CxrError, match="kermany-fullres"):
        run_suite(True, tmp_path, data=tmp_path / "absent")


def test_model_build_child_measures_the_cnn():
    result = run_child("benchmarks.complexity", ["--child", "build", "--model", "cnn"], timeout=300)
    assert result["parameters"] == 404_033
    assert 0 < result["build_seconds"] < 60 and 0 < result["rss_delta_mb"] < result["peak_rss_mb"]
