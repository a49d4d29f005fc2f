"""benchmarks.trust: what its summary decides met / NOT MET, from hand-made measurements."""
from __future__ import annotations

import pytest

from benchmarks.trust import ENSEMBLE_SIZES, summarise


def variant(name: str, members: int, ms: float) -> dict:
    return {"name": name, "members": members, "bytes": members * 1_600_000, "peak_rss_delta_mb": 10.0 + members,
            "threads": {"1": {"median_ms": ms, "p90_ms": 1.1 * ms}, "2": {"median_ms": ms / 1.8, "p90_ms": ms / 1.6}}}


def results(calibrated_ms: float, per_member_ms: float, tta_ms: float) -> dict:
    variants = [variant("single", 1, 4.0), variant("temperature", 1, 4.0), variant("isotonic", 1, calibrated_ms)]
    variants += [variant(f"ensemble-{k}", k, k * per_member_ms) for k in ENSEMBLE_SIZES]
    return {"run": "runs/x", "runs": 100, "repeats": 3, "images": 64, "input_shape": [64, 64, 1],
            "variants": variants, "tta_ms_per_image": {"plain": 4.2, "tta": tta_ms}}


@pytest.mark.parametrize("calibrated, member, tta, statuses", [
    (4.2, 4.1, 16.0, ["met", "met", "met"]),
    (4.6, 4.1, 16.0, ["NOT MET", "met", "met"]),
    (4.0, 4.5, 19.5, ["met", "NOT MET", "NOT MET"])])
def test_summarise_decides_met_and_not_met(calibrated, member, tta, statuses):
    checks, md = summarise(results(calibrated, member, tta))
    assert [c["status"] for c in checks] == statuses
    assert checks[0]["measured"] == pytest.approx(calibrated / 4.0 - 1)
    assert checks[1]["measured"] == pytest.approx(member / 4.0)
    assert checks[2]["measured"] == pytest.approx(tta / 4.2)
    assert "ensemble-5 | 5 | 8.00 |" in md and "single + TTA" in md
