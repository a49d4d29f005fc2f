"""benchmarks.shift: what its summary decides met / NOT MET, from hand-made measurements."""
from __future__ import annotations

import pytest

from benchmarks.shift import summarise


def results(auc: float, specificity: float, adapted_ece: float, ood_flagged: float) -> dict:
    figures = {"roc_auc": auc, "accuracy": 0.91, "sensitivity": 0.96, "specificity": specificity, "ece": 0.05}
    intervals = {k: {"value": v, "low": v - 0.02, "high": min(v + 0.02, 1.0)} for k, v in figures.items()
                 if k != "ece"}
    quality = {"external": dict(figures), "val_ece": 0.03, "params": {}}
    return {"run": "runs/x/final", "external": "/data/site-b", "n_external": 312, "external_class_counts": [117, 195],
            "threshold": 0.4, "calibration_method": "temperature", "as_served": {**figures, "intervals": intervals},
            "calibration": {m: quality for m in ("none", "temperature", "platt", "isotonic")},
            "adaptation": {"labelled": 100, "draws": 30, "mean": {**figures, "ece": adapted_ece},
                           "sd": {k: 0.01 for k in figures}, "coverage": {"accuracy": 0.97, "sensitivity": 0.93,
                                                                           "specificity": 0.9}},
            "adabn": {"roc_auc_before": auc, "roc_auc_after": auc + 0.001},
            "guard": {"threshold": -0.4, "val_flagged": 0.006, "external_flagged": 0.01, "ood_flagged": ood_flagged,
                      "n_ood": 12, "separation_auc": {"guard": 1.0, "energy": 0.45, "max_probability": 0.56},
                      "adult_chest": {"score": -0.3, "flagged": True}}}


@pytest.mark.parametrize("auc, specificity, adapted_ece, ood, failing", [
    (0.97, 0.85, 0.04, 1.0, []),
    (0.95, 0.85, 0.04, 1.0, ["site-b: roc_auc at the run's threshold"]),
    (0.97, 0.70, 0.06, 11 / 12, ["site-b: specificity at the run's threshold",
                                 "site-b: ECE after adapting on 100 labelled (mean of 30 draws)",
                                 "guard: share of the other-kind images flagged"])])
def test_summarise_decides_met_and_not_met(auc, specificity, adapted_ece, ood, failing):
    checks, md = summarise(results(auc, specificity, adapted_ece, ood))
    assert [c["name"] for c in checks if c["status"] != "met"] == failing
    assert len(checks) == 8
    assert "guard 1.000, energy 0.450, maximum probability 0.560" in md and "Development figures" in md
