"""benchmarks.preprocess: what its summary decides met / NOT MET, named by the factor it measured."""
from __future__ import annotations

import pytest

from benchmarks.preprocess import summarise


def results(big: int, rates: dict[str, float], rss: tuple[float, float] = (160.0, 170.0)) -> dict:
    runs = []
    for factor in (1, big):
        for variant, rate in rates.items():
            runs.append({"variant": variant, "n_factor": factor, "inputs": 480 * factor, "images": 480 * factor,
                         "seconds": 480 * factor / rate, "images_per_second": rate,
                         "peak_rss_mb": rss[0] if factor == 1 else rss[1]})
    return {"data": "x", "repeat": big, "size": 224, "runs": runs}


RATES = {"thesis": 160.0, "decode": 200.0, "tfdata": 200.0, "cxrscale-1": 180.0}


@pytest.mark.parametrize("big", [2, 4])
def test_checks_are_named_by_the_factor_measured(big):
    checks, _ = summarise(results(big, {**RATES, "cxrscale-2": 350.0}))
    names = [c["name"] for c in checks]
    assert f"driver_rss_mb_at_{big}N" in names and f"driver_rss_growth_{big}N_vs_N" in names
    assert not any(f"_{other}N" in n for n in names for other in {2, 4} - {big})


@pytest.mark.parametrize("ours, statuses", [
    (400.0, {"speedup_vs_thesis": "met", "cxrscale-2 / decode-bound ceiling (2 x serial decode)": "met",
             "per-image work beyond the decode, ms per worker (cxrscale-2)": "met"}),
    (300.0, {"speedup_vs_thesis": "NOT MET", "cxrscale-2 / decode-bound ceiling (2 x serial decode)": "NOT MET",
             "per-image work beyond the decode, ms per worker (cxrscale-2)": "NOT MET"})])
def test_speed_against_the_thesis_and_the_decode_bound_ceiling(ours, statuses):
    checks, md = summarise(results(2, {**RATES, "cxrscale-2": ours}))
    got = {c["name"]: c for c in checks}
    assert {k: got[k]["status"] for k in statuses} == statuses
    assert got["cxrscale-2 / decode-bound ceiling (2 x serial decode)"]["measured"] == pytest.approx(ours / 400)
    # 2 workers at `ours` images/s spend 2 / ours s per image each; the decode takes 1 / 200 s of it
    assert got["per-image work beyond the decode, ms per worker (cxrscale-2)"]["measured"] == pytest.approx(
        1e3 * (2 / ours - 1 / 200))
    assert "2 workers are bound by 400.0 images/s" in md


def test_ratios_pair_the_runs_of_one_round():
    """A slow round slows every variant run in it: the ratio is the median of same-round ratios, not the ratio
    of the medians."""
    data = results(2, {**RATES, "cxrscale-2": 400.0})
    for run in data["runs"]:
        run["round_rates"] = [run["images_per_second"] * k for k in (1.0, 0.6, 1.1)]
        if run["variant"] == "tfdata" and run["n_factor"] == 2:
            run["round_rates"] = [200.0, 100.0, 300.0]  # median 200, but 400/200, 240/100, 440/300 in the rounds
    checks, md = summarise(data)
    got = {c["name"]: c["measured"] for c in checks}
    assert got["speedup_vs_tfdata (decode + resize)"] == pytest.approx(2.0)  # median of 2.0, 2.4, 1.467
    assert "each round" in md
