"""benchmarks.members: every ensemble of the members, formed from their logits; what it reports."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.members import compare, member_labels, summarise
from cxrscale.errors import CxrError
from distributed.evaluation.scores import ThresholdRule
from distributed.model import metrics as m
from distributed.model.calibration import fit_calibration
from distributed.model.heads import Head


def synthetic_members(seed: int = 0) -> dict[str, dict]:
    """Three members: two that share most of their error (as seeds of one model do) and one that does not."""
    rng = np.random.default_rng(seed)
    y_val, y_ext = (rng.random(300) < 0.7).astype(int), (rng.random(200) < 0.6).astype(int)
    common_val, common_ext = rng.normal(0, 1.5, 300), rng.normal(0.5, 1.5, 200)  # the site shifts the scores up
    members = {}
    for name, shared in (("a", 1.0), ("b", 1.0), ("c", 0.0)):
        members[name] = {"run": f"/runs/{name}", "model": "cnn" if shared else "resnet18-half",
                         "y_val": y_val, "y_ext": y_ext,
                         "z_val": 2.5 * (2 * y_val - 1) + shared * common_val + rng.normal(0, 1.5, 300),
                         "z_ext": 2.5 * (2 * y_ext - 1) + shared * common_ext + rng.normal(0, 1.5, 200)}
    return members


def test_every_ensemble_is_what_the_mean_logit_calibrated_on_validation_gives():
    members = synthetic_members()
    out = compare(members, "temperature", "youden", max_size=3, n_bootstrap=200)
    assert [r["members"] for r in out["ensembles"]] == [["a"], ["b"], ["c"], ["a", "b"], ["a", "c"], ["b", "c"],
                                                        ["a", "b", "c"]]
    head = Head("binary", 1)
    for row in out["ensembles"]:
        z_val = np.mean([members[n]["z_val"] for n in row["members"]], axis=0)
        z_ext = np.mean([members[n]["z_ext"] for n in row["members"]], axis=0)
        calibration = fit_calibration("temperature", members["a"]["y_val"], z_val, head)
        p_val, p_ext = calibration.apply(head, z_val)[:, 1], calibration.apply(head, z_ext)[:, 1]
        threshold = ThresholdRule("youden").choose(members["a"]["y_val"], p_val)
        assert row["threshold"] == pytest.approx(threshold)
        assert row["calibration"] == calibration.to_dict()
        y_ext = members["a"]["y_ext"]
        assert row["external"]["roc_auc"]["value"] == pytest.approx(m.roc_auc(y_ext, z_ext))
        assert row["external"]["specificity"]["value"] == pytest.approx(np.mean(p_ext[y_ext == 0] < threshold))
        assert row["external_ece"] == pytest.approx(m.expected_calibration_error(y_ext, p_ext))
        stability = row["stability"]
        assert stability["low"] <= stability["median"] <= stability["high"] and stability["resamples"] == 200
    corr = np.array(out["correlation"]["external"])
    assert np.allclose(np.diag(corr), 1.0) and corr[0, 1] > corr[0, 2] + 0.1  # a and b share their error
    # averaging members whose errors differ ranks better than either alone; the same error does not average out
    auc = {tuple(r["members"]): r["external"]["roc_auc"]["value"] for r in out["ensembles"]}
    assert auc[("a", "c")] > max(auc[("a",)], auc[("c",)])
    assert out["n_val"] == 300 and out["n_external"] == 200 and out["threshold_rule"] == "youden"


def test_max_size_and_a_fixed_threshold():
    out = compare(synthetic_members(), "none", "0.5", max_size=1, n_bootstrap=100)
    assert [r["members"] for r in out["ensembles"]] == [["a"], ["b"], ["c"]]
    assert all(r["threshold"] == 0.5 and r["stability"] is None for r in out["ensembles"])  # not chosen on validation


def test_summary_ranks_by_the_external_roc_auc():
    results = {"external": "/data/site-b", **compare(synthetic_members(), "auto", "youden", max_size=3,
                                                     n_bootstrap=100)}
    checks, md = summarise(results)
    assert checks == []
    table = md.split("best site-b ROC-AUC first")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "members" not in line]
    assert len(rows) == 7
    aucs = [float(r.split(" | ")[2].split(" ")[0]) for r in rows]
    assert aucs == sorted(aucs, reverse=True)
    assert "| a | cnn |" in md and "| c | resnet18-half |" in md and "development figures" in md


def test_member_labels_are_the_shortest_unique_path_tails(tmp_path):
    runs = [tmp_path / "kermany" / "members" / "seed0", tmp_path / "resnet" / "members" / "seed0",
            tmp_path / "kermany" / "members" / "seed1"]
    assert member_labels(runs) == ["kermany/members/seed0", "resnet/members/seed0", "kermany/members/seed1"]
    assert member_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
    with pytest.raises(CxrError, match="names 1 run folder"):
        member_labels([tmp_path / "a", tmp_path / "x" / ".." / "a"])


def test_bad_options_are_named(tmp_path):
    from benchmarks.members import main

    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    with pytest.raises(CxrError, match="--runs needs at least two"):
        main(["--runs", str(tmp_path / "r1")])
    with pytest.raises(CxrError, match=r"--runs .*missing does not exist"):
        main(["--runs", str(tmp_path / "r1"), str(tmp_path / "missing")])
    for size in ("3", "0"):
        with pytest.raises(CxrError, match=f"--max-size {size}: between 1 and the 2 --runs"):
            main(["--runs", str(tmp_path / "r1"), str(tmp_path / "r2"), "--max-size", size])
    with pytest.raises(CxrError, match="--threshold"):
        main(["--runs", str(tmp_path / "r1"), str(tmp_path / "r2"), "--threshold", "best"])
    with pytest.raises(CxrError, match=r"--external .*nowhere does not exist"):
        main(["--runs", str(tmp_path / "r1"), str(tmp_path / "r2"), "--external", str(tmp_path / "nowhere")])


def test_the_robust_rule_reads_the_members_validation_under_the_shifts():
    """Members scored under acquisition shifts (score_members(shifted=True)): each ensemble's robust threshold
    is the worst-case Youden threshold of its calibrated validation probabilities as they are and under each
    shift. Here one shift raises the normals' logits, so the robust threshold sits above Youden's."""
    members = synthetic_members()
    rng = np.random.default_rng(5)
    for member in members.values():
        y, z = member["y_val"], member["z_val"]
        member["z_val_shifted"] = np.stack([z + rng.normal(0, 0.3, len(z)), np.where(y == 0, z + 3.0, z)])
    robust = compare(members, "temperature", "robust", max_size=2, n_bootstrap=100)
    youden = compare(members, "temperature", "youden", max_size=2, n_bootstrap=100)
    head = Head("binary", 1)
    for row, plain in zip(robust["ensembles"], youden["ensembles"]):
        z_val = np.mean([members[n]["z_val"] for n in row["members"]], axis=0)
        shifted = np.mean([members[n]["z_val_shifted"] for n in row["members"]], axis=0)
        calibration = fit_calibration("temperature", members["a"]["y_val"], z_val, head)
        scorings = np.stack([calibration.apply(head, z)[:, 1] for z in (z_val, *shifted)])
        assert row["threshold"] == pytest.approx(m.worst_case_youden_threshold(members["a"]["y_val"], scorings))
        assert row["threshold"] > plain["threshold"]
        assert row["stability"]["low"] <= row["threshold"] <= row["stability"]["high"]
    assert robust["threshold_rule"] == "robust"
    with pytest.raises(CxrError, match="--threshold robust: the validation split was not scored under"):
        compare(synthetic_members(), "temperature", "robust", max_size=1, n_bootstrap=100)
