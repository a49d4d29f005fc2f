"""Site adaptation: the bootstrap numbers (pure), and python -m distributed.adapt on a real run with real
external radiographs, whose output run folder evaluate and predict take as it is."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cxrscale.errors import CxrError
from distributed.evaluation.adaptation import adapt_site
from distributed.evaluation.scores import ThresholdRule
from distributed.model.heads import Head
from tests.distributed.test_evaluate import run_module
from tests.training_fixtures import quiet

BINARY = Head("binary", 1)


def shifted_site(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A site where the model ranks well but every logit sits 2 too high (it over-calls the positive class)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    return y, (rng.normal(0, 1, n) + 1.2 * (2 * y - 1) + 2.0)[:, None]


def test_the_site_threshold_and_calibration_undo_a_shift():
    y, z = shifted_site(150)
    site = adapt_site(y, z, BINARY, method="platt", rule=ThresholdRule("youden"), n_bootstrap=60)
    assert site["calibration"]["method"] == "platt" and site["calibration"]["params"]["b"] < -1  # the offset
    assert site["apparent"]["ece"] < site["before"]["ece"]
    y_new, z_new = shifted_site(2000, seed=1)  # more images of the same site
    from distributed.model.calibration import Calibration

    p_new = Calibration.from_dict(site["calibration"]).apply(BINARY, z_new)[:, 1]
    specificity = np.mean(p_new[y_new == 0] < site["threshold"])
    assert site["out_of_bag"]["specificity"]["low"] <= specificity <= site["out_of_bag"]["specificity"]["high"]
    assert np.mean(1 / (1 + np.exp(-z_new[y_new == 0, 0])) < 0.5) < specificity  # better than as trained
    iv = site["out_of_bag"]["sensitivity"]
    half = (iv["high"] - iv["low"]) / 2
    assert site["narrowing"]["sensitivity"]["images_for_target"] == int(np.ceil(150 * (half / 0.05) ** 2))
    low, high = site["threshold_interval"]["low"], site["threshold_interval"]["high"]
    assert low <= site["threshold"] <= high


def test_a_sample_too_small_or_a_fixed_threshold_is_refused():
    y, z = shifted_site(150)
    with pytest.raises(CxrError, match="at least 10 of each"):
        adapt_site(y[:12], z[:12], BINARY, method="platt", rule=ThresholdRule("youden"))
    with pytest.raises(CxrError, match="a fixed threshold is not adapted"):
        adapt_site(y, z, BINARY, method="platt", rule=ThresholdRule("fixed", 0.5))


def test_the_robust_rule_is_refused_at_a_site(capsys):
    """The robust rule guards a threshold chosen on the training source's validation against other sites;
    adapt chooses it on the site's own images, so the option is refused with that reason."""
    from distributed.adapt import parse_config

    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--run", "r", "--labelled", "l", "--site", "s", "--output", "o", "--threshold", "robust"])
    assert exit_info.value.code == 2
    assert "--threshold robust guards a threshold chosen on the training source's validation split" in \
        capsys.readouterr().err


def test_a_sample_error_names_the_option_that_gave_it(tmp_path):
    """The folder and CSV reader behind --labelled (adapt) and --external (benchmarks.shift and .members) names
    that option, not preprocessing's --input, in its errors."""
    from distributed.adapt import labelled_sample
    from preprocessing.transform import TransformParams

    classes, params = ["NORMAL", "PNEUMONIA"], TransformParams()
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"")
    for option in ("--labelled", "--external"):
        with pytest.raises(CxrError, match=f"^{option} .*flat has no class folders"):
            labelled_sample(str(flat), classes, params, option=option)
    table = tmp_path / "site.csv"
    table.write_text("path,label\na.png,NORMAL\na.png,PNEUMONIA\n")
    with pytest.raises(CxrError, match=r"^--labelled .*site.csv line 3: path a.png repeats line 2"):
        labelled_sample(str(table), classes, params)
    table.write_bytes(b"path,label\n\xff.png,NORMAL\n")
    with pytest.raises(CxrError, match=r"^--external .*site.csv is not a UTF-8 CSV"):
        labelled_sample(str(table), classes, params, option="--external")


def test_adapt_a_real_run_to_the_external_set(real_run, shared_data, tmp_path):
    """60 labelled external radiographs refit the real run's calibration and threshold (and AdaBN on 40 more);
    the adapted run is evaluated at the site's threshold, its card records the site, and predict uses it."""
    external = shared_data / "kermany224-external-dev"
    labelled = tmp_path / "site" / "labelled"
    for cls, count in (("NORMAL", 25), ("PNEUMONIA", 35)):
        (labelled / cls).mkdir(parents=True)
        for f in sorted((external / cls).glob("*.jpeg"))[:count]:
            os.symlink(f, labelled / cls / f.name)
    unlabelled = tmp_path / "site" / "scans"
    unlabelled.mkdir()
    for f in sorted((external / "PNEUMONIA").glob("*.jpeg"))[-20:] + sorted((external / "NORMAL").glob("*.jpeg"))[-20:]:
        os.symlink(f, unlabelled / f.name)
    out = tmp_path / "adapted"
    result = run_module("distributed.adapt", "--run", str(real_run["run"]), "--labelled", str(labelled),
                        "--unlabelled", str(unlabelled), "--adabn", "--site", "external-a", "--output", str(out),
                        "--bootstrap", "100")
    assert result.returncode == 0, quiet(result.stderr)
    record = json.loads((out / "adaptation.json").read_text())
    site = record["labelled"]
    assert record["site"] == "external-a" and record["adabn"]["images"] == 40 and site["n"] == 60
    assert site["class_counts"] == [25, 35] and site["bootstrap_rounds"] > 80
    config = json.loads((out / "config.json").read_text())
    assert config["adaptation"]["site"] == "external-a" and config["config"]["data"] == str(real_run["data"])
    assert json.loads((out / "calibration.json").read_text())["fitted_on"] == "site external-a: 60 labelled images"
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["threshold"]["value"] == pytest.approx(site["threshold"])
    assert "external-a" in metrics["threshold"]["chosen_on"]
    card = (out / "model_card.md").read_text()
    assert "## Site adaptation" in card and "external-a" in card and "60 labelled images" in card
    assert (out / "eval" / "guard.npz").is_file()  # the original run's guard travels with it
    files = [str(p) for p in sorted((external / "NORMAL").glob("*.jpeg"))[30:33]]
    predicted = run_module("distributed.predict", "--run", str(out), "--format", "json", *files)
    assert predicted.returncode == 0, quiet(predicted.stderr)
    assert all(row["threshold"] == pytest.approx(site["threshold"]) for row in json.loads(predicted.stdout))
    from distributed.adapt import adapt, parse_config

    with pytest.raises(CxrError, match="already holds a model"):  # an adapted run is never replaced
        adapt(parse_config(["--run", str(real_run["run"]), "--labelled", str(labelled), "--site", "x",
                            "--output", str(out)]))
