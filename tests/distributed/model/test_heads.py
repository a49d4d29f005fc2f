"""distributed.model.heads: the head rule, asked by every stage instead of the output shape."""
from __future__ import annotations

import numpy as np
import pytest

from distributed.model.heads import Head, ModelError


def test_the_head_of_a_class_count():
    assert Head.for_classes(2) == Head("binary", 1)
    assert Head.for_classes(2, two_unit_softmax=True) == Head("binary", 2)
    assert Head.for_classes(4) == Head("multiclass", 4)
    assert Head.for_classes(14, multilabel=True) == Head("multilabel", 14)
    for bad in (1, 0, True, 2.0):
        with pytest.raises(ModelError, match="classes"):
            Head.for_classes(bad)
    with pytest.raises(ModelError, match="cannot have 3"):
        Head("binary", 3)
    with pytest.raises(ModelError, match="unknown head kind"):
        Head("regression", 1)


@pytest.mark.parametrize("head, columns, activation, form", [
    (Head("binary", 1), 2, "sigmoid", "binary"),
    (Head("binary", 2), 2, "softmax", "index"),
    (Head("multiclass", 3), 3, "softmax", "index"),
    (Head("multilabel", 3), 3, "sigmoid", "multihot"),
])
def test_what_each_head_means(head, columns, activation, form):
    assert (head.columns, head.activation, head.label_form) == (columns, activation, form)
    assert Head.from_dict(head.to_dict()) == head


def test_probabilities_are_one_column_per_class_or_label():
    np.testing.assert_allclose(Head("binary", 1).probabilities(np.array([[0.25], [1.0]])), [[0.75, 0.25], [0, 1]])
    np.testing.assert_allclose(Head("binary", 1).probabilities(np.array([0.1])), [[0.9, 0.1]])
    softmax = np.array([[0.2, 0.3, 0.5]], np.float32)
    np.testing.assert_array_equal(Head("multiclass", 3).probabilities(softmax), softmax)
    independent = np.array([[0.9, 0.8, 0.1]])  # several labels at once: no renormalising
    np.testing.assert_array_equal(Head("multilabel", 3).probabilities(independent), independent)
    with pytest.raises(ValueError, match="outputs"):
        Head("multiclass", 3).probabilities(np.zeros((2, 2)))


def test_activation_and_decisions_follow_the_head():
    z = np.array([[0.0], [2.0]])
    np.testing.assert_allclose(Head("binary", 1).activate(z)[:, 1], 1 / (1 + np.exp(-z[:, 0])))
    np.testing.assert_allclose(Head("multiclass", 3).activate(np.zeros((1, 3))), [[1 / 3] * 3])
    np.testing.assert_allclose(Head("multilabel", 2).activate(np.zeros((1, 2))), [[0.5, 0.5]])
    assert Head("binary", 2).positive_logit(np.array([[1.0, 3.0]])).tolist() == [2.0]
    with pytest.raises(ModelError, match="no single positive-class logit"):
        Head("multiclass", 3).positive_logit(np.zeros((1, 3)))
    probs = np.array([[0.7, 0.3], [0.4, 0.6]])
    assert Head("binary", 1).decide(probs, 0.25).tolist() == [1, 1]
    assert Head("binary", 1).decide(probs).tolist() == [0, 1]
    assert Head("multilabel", 2).decide(probs, np.array([0.5, 0.5])).tolist() == [[1, 0], [0, 1]]


def test_a_model_says_which_head_it_has():
    from distributed.model.zoo import build_model
    from distributed.model.calibration import Calibration, calibrated_model

    vgg = build_model("vgg16", 32, 2, seed=0)
    assert Head.of_model(vgg) == Head("binary", 2)
    platt = calibrated_model(vgg, Calibration("platt", {"a": 1.0, "b": 0.0}))
    # Platt on a 2-unit softmax ends in one sigmoid unit; its logits keep both units
    assert Head.of_model(platt) == Head("binary", 1) and Head.of_logits(platt) == Head("binary", 2)
    assert Head.of_model(build_model("cnn", 16, 3, seed=0)) == Head("multiclass", 3)
    assert Head.of_outputs(4, "sigmoid") == Head("multilabel", 4)


def test_an_export_that_outputs_the_probability_columns_keeps_its_runs_head_kind():
    assert Head("binary", 1).in_form(1) == Head("binary", 1)
    assert Head("binary", 1).in_form(2) == Head("binary", 2)  # optimize.export's [1 - p, p]
    assert Head("multiclass", 3).in_form(3) == Head("multiclass", 3)
    assert Head("multiclass", 3).in_form(2) is None


def test_training_accuracy_reads_a_blended_target_as_its_larger_share():
    """Under --mixup a target is 0.7, not 1: the accuracy counts it as 1 (Keras's BinaryAccuracy counts it
    wrong whatever the prediction); an unknown multi-label finding (-1) still counts for nothing."""
    for head, y_true, y_pred, expected in [
            (Head.for_classes(2), [[0.7], [0.2], [1.0], [0.4]], [[0.9], [0.1], [0.8], [0.6]], 0.75),
            (Head.for_classes(3, multilabel=True), [[0.7, -1.0, 0.0], [0.3, 1.0, 0.6]],
             [[0.9, 0.9, 0.9], [0.2, 0.8, 0.4]], (0.5 + 2 / 3) / 2)]:
        metric = head.accuracy()
        metric.update_state(np.array(y_true, np.float32), np.array(y_pred, np.float32))
        assert metric.result().numpy() == pytest.approx(expected), head.describe()
