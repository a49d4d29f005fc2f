"""benchmarks.shift: what its summary decides met / NOT MET, from hand-made measurements."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.shift import ADAPT_METHODS, _adaptation, _ece_floor, summarise
from distributed.model.heads import Head


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
                                                                           "specificity": 0.9},
                           "method": "temperature", "ece_floor": {"mean": 0.031, "sd": 0.004},
                           "methods": {m: {"mean": {**figures, "ece": adapted_ece}, "sd": {k: 0.01 for k in figures}}
                                       for m in ("temperature", "platt", "isotonic")}},
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
    assert "exactly right (labels drawn from them): 0.031 (sd 0.004)" in md
    assert md.count(f"| {adapted_ece:.3f} (0.010) |") == 3  # one row per method


def test_ece_floor_is_the_binned_estimators_bias_on_calibrated_labels():
    # p = 0.5 everywhere: one bin, ECE = |mean(y) - 0.5|, whose mean is 0.5 * sqrt(2 / pi) / sqrt(n)
    rng = np.random.default_rng(0)
    for n in (50, 200):
        assert _ece_floor(np.full(n, 0.5), rng, simulations=4000) == pytest.approx(0.5 * np.sqrt(2 / np.pi / n),
                                                                                    rel=0.05)
    assert _ece_floor(np.r_[np.zeros(100), np.ones(100)], rng) == 0.0  # certain and right: no noise


def test_adaptation_compares_every_method_on_the_same_draws():
    # logits of a calibrated model at temperature 1 (y ~ Bernoulli(sigmoid(z))), as the model would emit at 2
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2.5, 400)
    y = (rng.random(400) < 1 / (1 + np.exp(-z))).astype(int)
    out = _adaptation(y, 2 * z[:, None], Head("binary", 1), labelled=150, draws=3, seed=0)
    assert out["method"] == "temperature" and set(out["methods"]) == set(ADAPT_METHODS)
    assert len(out["rounds"]) == 3 and set(out["coverage"]) == {"sensitivity", "specificity", "accuracy"}
    assert out["methods"]["temperature"]["mean"] == out["mean"]
    # every method ranks the rest alike (monotone maps of one logit; isotonic may tie a few)
    assert out["methods"]["platt"]["mean"]["roc_auc"] == pytest.approx(out["mean"]["roc_auc"], abs=1e-9)
    assert out["methods"]["isotonic"]["mean"]["roc_auc"] == pytest.approx(out["mean"]["roc_auc"], abs=0.02)
    # the refitted temperature undoes the doubling: its ECE sits near what exact probabilities read
    assert out["mean"]["ece"] < out["ece_floor"]["mean"] + 0.03
    assert 0.01 < out["ece_floor"]["mean"] < 0.08
