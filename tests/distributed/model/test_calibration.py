"""Calibration: the fits recover known maps, the in-graph layers compute exactly the fitted map, and the
calibrated model survives SavedModel export and TFLite conversion."""
from __future__ import annotations

import numpy as np
import pytest

from distributed.model.kerasenv import keras
from distributed.model import calibration as C
from distributed.model.builders import ModelError
from distributed.model.zoo import build_model
from distributed.model.heads import Head

BINARY, THREE = Head("binary", 1), Head("multiclass", 3)


def overconfident(n: int = 4000, temperature: float = 3.0, seed: int = 0):
    """Labels drawn from sigmoid(z), and the logits a model 'temperature' times too confident reports."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(0.5, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    return y, (true_logit * temperature)[:, None]


def test_temperature_recovers_the_overconfidence_and_lowers_the_ece():
    y, z = overconfident(temperature=3.0)
    cal = C.fit_calibration("temperature", y, z, BINARY)
    assert cal.params["temperature"] == pytest.approx(3.0, rel=0.1)
    summary = C.calibration_summary(y, z, cal, BINARY)
    assert summary["before"]["ece"] > 0.1 and summary["after"]["ece"] < 0.03
    assert summary["after"]["log_loss"] < summary["before"]["log_loss"]
    assert summary["after"]["brier"] < summary["before"]["brier"]


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_platt_and_isotonic_lower_the_ece(method):
    y, z = overconfident(temperature=0.3, seed=1)  # under-confident this time
    cal = C.fit_calibration(method, y, z, BINARY)
    summary = C.calibration_summary(y, z, cal, BINARY)
    assert summary["after"]["ece"] < 0.03 < summary["before"]["ece"]
    probs = cal.apply(BINARY, z)
    assert probs.shape == (len(y), 2) and np.all((probs >= 0) & (probs <= 1))
    assert np.all(np.diff(probs[np.argsort(z[:, 0]), 1]) >= -1e-12)  # monotone: the ranking is kept


def test_bad_requests_are_clear():
    y, z = overconfident(200)
    with pytest.raises(ModelError, match="only one class"):
        C.fit_calibration("temperature", np.zeros(200, int), z, BINARY)
    with pytest.raises(ModelError, match="two classes"):
        C.fit_calibration("platt", np.arange(30) % 3, np.zeros((30, 3)), THREE)
    with pytest.raises(ModelError, match="choose one of"):
        C.fit_calibration("beta", y, z, BINARY)


def small_model(units: int) -> keras.Model:
    """A small model with a binary head of `units` (1: a sigmoid, as the CNN's; 2: a softmax, VGG16's), named as
    the builders name theirs: the calibration graph depends on the head alone, and a small model saves and
    converts quickly."""
    keras.utils.set_random_seed(0)
    image = keras.Input((32, 32, 1), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255, name="pixels_to_unit")(image)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="block1_conv1")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_global_avg_pool")(x)
    logits = keras.layers.Dense(units, name="logits", dtype="float32")(x)
    activation = "sigmoid" if units == 1 else "softmax"
    return keras.Model(image, keras.layers.Activation(activation, name="predictions", dtype="float32")(logits))


# Each map on a small sigmoid model, isotonic also on the real CNN, and a 2-unit softmax (VGG16's head) once,
# through the logit difference; temperature on a softmax is the three-class run's calibration
# (tests/distributed/test_train_options.py)
@pytest.mark.parametrize("name, method", [("sigmoid", "temperature"), ("sigmoid", "platt"), ("cnn", "isotonic"),
                                          ("softmax-pair", "isotonic")])
def test_the_calibrated_graph_computes_the_fitted_map_in_savedmodel_and_tflite(tmp_path, name, method):
    import tensorflow as tf

    model = {"sigmoid": lambda: small_model(1), "softmax-pair": lambda: small_model(2),
             "cnn": lambda: build_model("cnn", 32, weights="none", seed=0)}[name]()
    assert Head.of_model(model).units == (2 if name == "softmax-pair" else 1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 1), dtype=np.uint8)
    z = C.logits_of(model, images)
    d = z[:, -1] - (z[:, 0] if z.shape[1] == 2 else 0)
    logits = model.get_layer("logits")  # an untrained model's logits spread ~1e-3: widen them as training does
    logits.set_weights([w * (2.0 / d.std()) for w in logits.get_weights()])
    z = C.logits_of(model, images)
    d = z[:, -1] - (z[:, 0] if z.shape[1] == 2 else 0)
    y = (d + rng.normal(0, d.std(), 64) > np.median(d)).astype(int)  # labels that follow the score loosely
    cal = C.fit_calibration(method, y, C.logits_of(model, images), Head.of_model(model))
    calibrated = C.calibrated_model(model, cal)
    assert calibrated.layers[-1].name == "predictions"
    assert any(C.is_calibration_layer(layer) for layer in calibrated.layers)
    expected = cal.apply(Head.of_model(model), C.logits_of(model, images))[:, 1]
    atol = 1e-3 if method == "isotonic" else 2e-5  # isotonic: steep segments between close knots, in float32
    got = calibrated.predict(images, verbose=0)
    got = got[:, -1] if got.shape[1] <= 2 else got
    np.testing.assert_allclose(got, expected, atol=atol)

    calibrated.save(str(tmp_path / "model"))
    loaded = keras.models.load_model(str(tmp_path / "model"), compile=False)
    np.testing.assert_allclose(loaded.predict(images, verbose=0)[:, -1], expected, atol=atol)
    again = C.calibrated_model(loaded, C.Calibration("none"))  # re-calibrating replaces the old layers
    assert not any(C.is_calibration_layer(layer) for layer in again.layers)
    check_scorer_gives_both_outputs_in_one_pass(tmp_path / "model", images, expected, atol)

    from ai_edge_litert.interpreter import Interpreter  # the runtime the toolkit serves TFLite with

    lite = Interpreter(model_content=tf.lite.TFLiteConverter.from_keras_model(calibrated).convert())
    inp, out = lite.get_input_details()[0], lite.get_output_details()[0]
    lite.resize_tensor_input(inp["index"], [len(images), 32, 32, 1])
    lite.allocate_tensors()
    lite.set_tensor(inp["index"], images)
    lite.invoke()
    lite_probs = lite.get_tensor(out["index"])[:, -1]
    if method == "isotonic":  # TFLite's own float rounding of the logits, times the map's steepest slopes
        assert np.mean(np.abs(lite_probs - expected)) < 2e-3 and np.max(np.abs(lite_probs - expected)) < 0.05
    else:
        np.testing.assert_allclose(lite_probs, expected, atol=1e-4)


def check_scorer_gives_both_outputs_in_one_pass(path, images, expected, atol):
    """evaluate's before/after figures: the Scorer's one forward pass gives the calibrated probabilities and
    the head's own ones, equal to scoring the whole model and its logits separately (with TTA too)."""
    from distributed.model.scorer import tta_views
    from distributed.model.scoring import load_scorer

    scorer = load_scorer(path)
    assert scorer.has_calibration
    after, before = scorer.predict_with_uncalibrated(images, batch_size=24)
    np.testing.assert_allclose(after[:, 1], expected, atol=atol)
    logit_head = Head.of_logits(scorer.keras_model)
    np.testing.assert_allclose(before, logit_head.activate(C.logits_of(scorer.keras_model, images)),
                               atol=1e-6)
    scorer.tta = True
    after, before = scorer.predict_with_uncalibrated(images, batch_size=24)
    np.testing.assert_allclose(after, scorer.predict(images, batch_size=24), atol=1e-6)
    head = Head.of_logits(scorer.keras_model)
    views = [head.activate(C.logits_of(scorer.keras_model, v)) for v in tta_views(images)]
    np.testing.assert_allclose(before, np.mean(views, axis=0), atol=1e-6)
    plain = path.parent / "uncalibrated"
    C.calibrated_model(scorer.keras_model, C.Calibration("none")).save(str(plain))
    scorer = load_scorer(plain)
    assert not scorer.has_calibration and scorer.predict_with_uncalibrated(images)[1] is None


def test_auto_is_temperature_for_every_head():
    """Platt's offset refits the training prevalence, which a shifted site does not share (docs/training.md)."""
    y, z = overconfident(500)
    assert C.fit_calibration("auto", y, z, BINARY).method == "temperature"
    assert C.fit_calibration("auto", np.arange(90) % 3, np.random.default_rng(0).normal(size=(90, 3)),
                             THREE).method == "temperature"
    with pytest.raises(ModelError, match="unknown calibration method 'auto'"):
        C.Calibration.from_dict({"method": "auto"})


def test_the_command_lines_offer_every_method():
    """train, ensemble and adapt read --calibration before TensorFlow loads, from their own list: it must be
    this module's."""
    from distributed.training.config import CALIBRATIONS

    assert CALIBRATIONS == C.METHODS


def test_platt_stays_finite_on_a_small_separable_validation_split():
    y = np.array([0] * 5 + [1] * 8)
    z = np.concatenate([np.linspace(-3, -1, 5), np.linspace(1, 4, 8)])[:, None]  # perfectly separated
    cal = C.fit_calibration("platt", y, z, BINARY)
    assert 0 < cal.params["a"] < 10
    p = cal.apply(BINARY, z)[:, 1]
    assert 0.05 < p.min() and p.max() < 0.99  # no hard 0/1 from 13 images
