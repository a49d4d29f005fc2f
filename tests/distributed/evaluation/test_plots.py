"""Evaluation figures: each PNG is written atomically and decodes, and what it says (AUC, operating points,
ECE, counts, titles) matches numbers computed independently here."""
from __future__ import annotations

import subprocess

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.text import Text
from sklearn.metrics import average_precision_score, roc_auc_score

from distributed.evaluation import plots
from distributed.model.heads import Head
from tests.conftest import PYTHON, REPO

BINARY = ["NORMAL", "PNEUMONIA"]
THREE = ["NORMAL", "BACTERIAL", "VIRAL"]
BINARY_HEAD, THREE_HEAD = Head("binary", 1), Head("multiclass", 3)


@pytest.fixture(scope="module")
def binary_data():
    """n=200, 80 NORMAL and 120 PNEUMONIA, P(PNEUMONIA) from two beta distributions (AUC about 0.93)."""
    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(80, int), np.ones(120, int)]
    s = np.r_[rng.beta(2, 5, 80), rng.beta(4, 2, 120)]
    return y, np.c_[1 - s, s]


@pytest.fixture(scope="module")
def three_class_data():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 3, 210)
    logits = rng.normal(0, 1, (210, 3))
    logits[np.arange(210), y] += 2.0
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


@pytest.fixture
def drawn(monkeypatch):
    """The figures each plot closed, to read their text after the PNG is written."""
    figures = []
    close = plt.close

    def recording_close(fig=None):
        figures.append(fig)
        close(fig)
    monkeypatch.setattr(plots.plt, "close", recording_close)
    return figures


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def assert_png(path, returned, min_side=250, max_side=4000) -> np.ndarray:
    """The PNG decodes, has a plausible size, replaced its temp file, and its figure was closed."""
    assert returned == path
    image = cv2.imread(str(path))
    assert image is not None, f"{path} does not decode"
    h, w = image.shape[:2]
    assert min_side <= h <= max_side and min_side <= w <= max_side, (h, w)
    assert image.std() > 5, "blank image"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "temporary file left behind"
    assert plt.get_fignums() == []
    return image


def binary_sens_spec(y, score, t):
    pred = score >= t
    return np.mean(pred[y == 1]), np.mean(~pred[y == 0])


# ---------------------------------------------------------------------------- every figure, binary and K=3

@pytest.mark.parametrize("kind", ["binary", "three"])
@pytest.mark.parametrize("name", ["roc", "precision_recall", "reliability", "score_histograms", "confusion"])
def test_each_figure_is_a_decodable_png(name, kind, binary_data, three_class_data, tmp_path):
    y, p = binary_data if kind == "binary" else three_class_data
    classes = BINARY if kind == "binary" else THREE
    path = tmp_path / f"{name}.png"
    grid_before = plt.rcParams["axes.grid"]
    if name == "confusion":
        matrix = np.zeros((len(classes), len(classes)), int)
        np.add.at(matrix, (y, p.argmax(axis=1)), 1)
        returned = plots.confusion(matrix, classes, path, title="test")
    else:
        returned = getattr(plots, name)(y, p, classes, path, head=BINARY_HEAD if kind == "binary" else THREE_HEAD)
    assert_png(path, returned)
    assert plt.rcParams["axes.grid"] == grid_before, "the module's style leaked into the global rcParams"


# ---------------------------------------------------------------------------- ROC and precision-recall

def test_roc_shows_auc_and_operating_points_where_they_are(binary_data, tmp_path, drawn):
    y, p = binary_data
    plots.roc(y, p, BINARY, tmp_path / "roc.png", head=BINARY_HEAD,
              operating_points=[("Youden (val)", 0.42), ("default", 0.5)])
    (fig,) = drawn
    labels = legend_texts(fig)
    assert f"PNEUMONIA: AUC {roc_auc_score(y, p[:, 1]):.3f}" in labels
    for name, t in [("Youden (val)", 0.42), ("default", 0.5)]:
        sens, spec = binary_sens_spec(y, p[:, 1], t)
        label = f"{name} t={t:.2f}: sens {sens:.2f}, spec {spec:.2f}"
        assert label in labels
        (marker,) = [line for line in fig.axes[0].lines if line.get_label() == label]
        assert marker.get_xdata()[0] == pytest.approx(1 - spec) and marker.get_ydata()[0] == pytest.approx(sens)
    ax = fig.axes[0]
    assert ax.get_xlim() == (0, 1) and ax.get_ylim() == (0, 1)
    assert "1 − specificity" in ax.get_xlabel() and "sensitivity" in ax.get_ylabel()


def test_roc_k3_has_one_curve_per_class_and_ignores_operating_points(three_class_data, tmp_path, drawn):
    y, p = three_class_data
    plots.roc(y, p, THREE, tmp_path / "roc.png", head=THREE_HEAD, operating_points=[("Youden", 0.4)])
    labels = legend_texts(drawn[0])
    for k, name in enumerate(THREE):
        assert f"{name} vs rest, AUC {roc_auc_score(y == k, p[:, k]):.3f}" in labels
    assert not any("t=" in label for label in labels)


def test_precision_recall_shows_average_precision_prevalence_and_ppv(binary_data, tmp_path, drawn):
    y, p = binary_data
    plots.precision_recall(y, p, BINARY, tmp_path / "pr.png", head=BINARY_HEAD,
                           operating_points=[("Youden (val)", 0.42)])
    labels = legend_texts(drawn[0])
    assert f"PNEUMONIA: AP {average_precision_score(y, p[:, 1]):.3f}" in labels
    assert "prevalence 0.60" in labels  # 120 of 200
    pred = p[:, 1] >= 0.42
    sens, ppv = np.mean(pred[y == 1]), np.mean(y[pred] == 1)
    assert f"Youden (val) t=0.42: sens {sens:.2f}, PPV {ppv:.2f}" in labels


def test_precision_recall_k3_lists_each_class(three_class_data, tmp_path, drawn):
    y, p = three_class_data
    plots.precision_recall(y, p, THREE, tmp_path / "pr.png", head=THREE_HEAD)
    labels = legend_texts(drawn[0])
    for k, name in enumerate(THREE):
        ap = average_precision_score(y == k, p[:, k])
        assert f"{name} vs rest: AP {ap:.3f} (prevalence {np.mean(y == k):.2f})" in labels


def test_a_split_of_one_class_cannot_have_roc_or_pr_but_gets_the_other_figures(tmp_path):
    y = np.ones(30, int)
    p = np.c_[np.linspace(0.6, 0.1, 30), np.linspace(0.4, 0.9, 30)]
    with pytest.raises(ValueError, match="ROC needs both classes in the labels"):
        plots.roc(y, p, BINARY, tmp_path / "roc.png", head=BINARY_HEAD)
    with pytest.raises(ValueError, match="needs both classes in the labels"):
        plots.precision_recall(y, p, BINARY, tmp_path / "pr.png", head=BINARY_HEAD)
    assert not (tmp_path / "roc.png").exists() and plt.get_fignums() == []
    for name in ("reliability", "score_histograms"):
        figure = getattr(plots, name)(y, p, BINARY, tmp_path / f"{name}.png", head=BINARY_HEAD)
        assert cv2.imread(str(figure)) is not None
    assert cv2.imread(str(plots.confusion([[0, 0], [4, 26]], BINARY, tmp_path / "cm.png"))) is not None


def test_k3_roc_skips_a_missing_class_and_says_so(three_class_data, tmp_path, drawn):
    y, p = three_class_data
    keep = y != 2
    plots.roc(y[keep], p[keep], THREE, tmp_path / "roc.png", head=THREE_HEAD)
    labels = legend_texts(drawn[0])
    assert "VIRAL: not in the labels, no curve" in labels
    assert sum("vs rest, AUC" in label for label in labels) == 2


@pytest.mark.parametrize("name", ["roc", "precision_recall", "reliability", "score_histograms"])
def test_bad_inputs_are_rejected_with_a_clear_message(name, binary_data, tmp_path):
    y, p = binary_data
    fn = getattr(plots, name)
    with pytest.raises(ValueError, match="200 labels but 199 rows"):
        fn(y, p[:-1], BINARY, tmp_path / "x.png", head=BINARY_HEAD)
    with pytest.raises(ValueError, match="probs must be 2-D"):
        fn(y, p[:, 1], BINARY, tmp_path / "x.png", head=BINARY_HEAD)
    with pytest.raises(ValueError, match="2 columns and 3 class names"):
        fn(y, p, THREE, tmp_path / "x.png", head=THREE_HEAD)
    with pytest.raises(ValueError, match="has 3 \\(these plots"):
        fn(y, p, BINARY, tmp_path / "x.png", head=THREE_HEAD)
    with pytest.raises(ValueError, match="class indices 0..1"):
        fn(np.r_[y[:-1], 2], p, BINARY, tmp_path / "x.png", head=BINARY_HEAD)
    with pytest.raises(ValueError, match="probabilities in"):
        fn(y, p * 2, BINARY, tmp_path / "x.png", head=BINARY_HEAD)
    assert not (tmp_path / "x.png").exists() and plt.get_fignums() == []


# ---------------------------------------------------------------------------- calibration

def test_ece_is_small_when_labels_follow_the_probabilities_and_large_when_not():
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 20_000)
    y = rng.uniform(0, 1, 20_000) < p
    assert plots.expected_calibration_error(y, p) < 0.02
    assert plots.expected_calibration_error(y, p ** 3) > 0.1


def test_reliability_title_reports_ece_binary_and_top_label(binary_data, three_class_data, tmp_path, drawn):
    y, p = binary_data
    plots.reliability(y, p, BINARY, tmp_path / "r2.png", head=BINARY_HEAD)
    y3, p3 = three_class_data
    plots.reliability(y3, p3, THREE, tmp_path / "r3.png", head=THREE_HEAD, n_bins=5)
    binary_ece = plots.expected_calibration_error(y == 1, p[:, 1])
    top_ece = plots.expected_calibration_error(p3.argmax(axis=1) == y3, p3.max(axis=1), n_bins=5)
    assert binary_ece != pytest.approx(top_ece)
    for fig, ece in zip(drawn, (binary_ece, top_ece)):
        top, bottom = fig.axes
        assert f"ECE {ece:.3f}" in top.get_title()
        assert bottom.get_ylabel() == "images (count)"
        assert sum(bar.get_height() for bar in bottom.patches) == (200 if fig is drawn[0] else 210)


# ---------------------------------------------------------------------------- confusion and histograms

def test_confusion_annotates_counts_and_row_fractions_readably(tmp_path, drawn):
    plots.confusion([[50, 0], [10, 40]], BINARY, tmp_path / "cm.png", title="test set")
    (fig,) = drawn
    counts, fractions = fig.axes
    cells = {t.get_text(): t.get_color() for t in fractions.texts}
    assert set(cells) == {"100.0%", "0.0%", "20.0%", "80.0%"}
    assert cells["100.0%"] == "white" and cells["0.0%"] == "black"
    assert sorted(t.get_text() for t in counts.texts) == ["0", "10", "40", "50"]
    assert counts.get_xlabel() == "predicted class" and counts.get_ylabel() == "true class"
    assert [t.get_text() for t in counts.get_xticklabels()] == BINARY
    assert "test set" in texts(fig)


def test_confusion_rejects_a_matrix_of_the_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="3 x 3"):
        plots.confusion(np.ones((2, 2), int), THREE, tmp_path / "cm.png")
    with pytest.raises(ValueError, match="non-negative integer"):
        plots.confusion([[1, -1], [0, 2]], BINARY, tmp_path / "cm.png")


def test_empty_true_class_row_is_not_a_division_by_zero(tmp_path, drawn):
    plots.confusion([[5, 1, 0], [0, 0, 0], [1, 0, 7]], THREE, tmp_path / "cm.png")
    assert [t.get_text() for t in drawn[0].axes[1].texts].count("n/a") == 3


def test_score_histograms_name_classes_counts_and_threshold(binary_data, three_class_data, tmp_path, drawn):
    y, p = binary_data
    assert_png(tmp_path / "h.png",
               plots.score_histograms(y, p, BINARY, tmp_path / "h.png", head=BINARY_HEAD, threshold=0.42))
    labels = legend_texts(drawn[0])
    assert {"NORMAL (n = 80)", "PNEUMONIA (n = 120)", "threshold 0.42"} <= set(labels)
    assert drawn[0].axes[0].get_xlabel() == "predicted probability of PNEUMONIA"
    y3, p3 = three_class_data
    plots.score_histograms(y3, p3, THREE, tmp_path / "h3.png", head=THREE_HEAD, threshold=0.42)
    panels = [ax for ax in drawn[1].axes if ax.get_legend()]
    assert len(panels) == 3
    assert not any("threshold" in label for label in legend_texts(drawn[1]))
    assert f"VIRAL (n = {np.sum(y3 == 2)})" in legend_texts(drawn[1])


# ---------------------------------------------------------------------------- gallery

def tile(seed: int, shape=(64, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_gallery_of_one_and_of_five(tmp_path, drawn):
    one = [{"image": tile(0), "true": "NORMAL", "predicted": "NORMAL", "confidence": 0.97}]
    five = [{"image": tile(i, shape), "true": "PNEUMONIA", "predicted": "NORMAL" if i % 2 else "PNEUMONIA",
             "confidence": 0.5 + i / 10, "caption": f"patient {i}"}
            for i, shape in enumerate([(64, 48), (64, 48, 1), (64, 48, 3), (32, 32), (64, 48)])]
    small = assert_png(tmp_path / "1" / "g.png", plots.gallery(one, tmp_path / "1" / "g.png"), min_side=150)
    large = assert_png(tmp_path / "5" / "g.png", plots.gallery(five, tmp_path / "5" / "g.png", columns=4))
    assert large.shape[1] > 3 * small.shape[1] and large.shape[0] > 1.5 * small.shape[0]  # 4 columns, 2 rows
    fig1, fig5 = drawn
    assert fig1.axes[0].get_title() == "true: NORMAL | pred: NORMAL (0.97)"
    tiles = [ax for ax in fig5.axes if ax.get_title()]
    assert len(tiles) == 5
    assert tiles[1].get_title() == "true: PNEUMONIA | pred: NORMAL (0.60)"
    assert tiles[0].title.get_color() == plots.RIGHT and tiles[1].title.get_color() == plots.WRONG
    assert tiles[2].get_xlabel() == "patient 2" and tiles[0].get_xticks().size == 0


def test_gallery_rejects_empty_and_malformed_items(tmp_path):
    with pytest.raises(ValueError, match="gallery needs at least one image"):
        plots.gallery([], tmp_path / "g.png")
    item = {"image": tile(0), "true": "NORMAL", "predicted": "NORMAL", "confidence": 0.9}
    with pytest.raises(ValueError, match="lacks confidence"):
        plots.gallery([{k: v for k, v in item.items() if k != "confidence"}], tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        plots.gallery([{**item, "image": np.zeros((8, 8, 4), np.uint8)}], tmp_path / "g.png")
    with pytest.raises(ValueError, match="uint8"):
        plots.gallery([{**item, "image": np.zeros((8, 8), float)}], tmp_path / "g.png")
    assert plt.get_fignums() == []


# ---------------------------------------------------------------------------- training curves

def history(n: int) -> list[dict]:
    return [{"epoch": e, "lr": 1e-3, "loss": 1 / e, "accuracy": 1 - 0.5 / e, "val_loss": 1.2 / e,
             "val_accuracy": 1 - 0.6 / e, "val_auc": 0.9 - abs(e - 3) / 100, "seconds": 5.0,
             "train_seconds": 4.0, "images_per_second": 100.0} for e in range(1, n + 1)]


def test_training_curves_mark_the_best_val_auc_epoch(tmp_path, drawn):
    assert_png(tmp_path / "h.png", plots.training_curves(history(6), tmp_path / "h.png"))
    (fig,) = drawn
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Accuracy", "Validation AUC"]
    assert all(ax.get_xlabel() == "epoch" for ax in fig.axes)
    best = [line for line in fig.axes[2].lines if line.get_label().startswith("best val AUC")]
    assert len(best) == 1 and best[0].get_xdata()[0] == 3
    assert best[0].get_label() == "best val AUC 0.900 (epoch 3)"


def test_training_curves_with_one_epoch(tmp_path, drawn):
    assert_png(tmp_path / "h.png", plots.training_curves(history(1), tmp_path / "h.png"))
    curves = [line for line in drawn[0].axes[0].lines if line.get_label() in ("train", "validation")]
    assert len(curves) == 2 and all(line.get_marker() == "o" for line in curves)
    assert [t for t in drawn[0].axes[0].get_xticks() if 0.5 <= t <= 1.5] == [1]


def test_training_curves_without_val_auc_and_with_csv_strings(tmp_path, drawn):
    rows = [{k: v for k, v in row.items() if k != "val_auc"} for row in history(4)]
    rows[1]["val_loss"] = float("nan")
    rows[2]["accuracy"] = ""  # as csv.DictReader gives an empty cell
    rows = [{k: str(v) for k, v in row.items()} for row in rows]
    assert_png(tmp_path / "h.png", plots.training_curves(rows, tmp_path / "h.png"))
    (fig,) = drawn
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Accuracy"]
    val_loss = [line for line in fig.axes[0].lines if line.get_label() == "validation"][0]
    assert list(val_loss.get_xdata()) == [1, 3, 4]
    assert not any("best" in label for label in legend_texts(fig))
    with pytest.raises(ValueError):
        plots.training_curves([], tmp_path / "h.png")


# ---------------------------------------------------------------------------- atomic writing, imports

def test_a_failed_save_keeps_the_previous_png_and_leaves_no_temp_file(binary_data, tmp_path, monkeypatch):
    y, p = binary_data
    path = plots.roc(y, p, BINARY, tmp_path / "roc.png", head=BINARY_HEAD)
    before = path.read_bytes()

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG half")
        raise OSError("disk full")
    monkeypatch.setattr(plots.plt.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plots.roc(y, p, BINARY, path, head=BINARY_HEAD)
    assert path.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["roc.png"]
    assert plt.get_fignums() == []


def test_importing_plots_does_not_import_tensorflow():
    code = ("import sys, distributed.evaluation.plots; "
            "print('tensorflow' in sys.modules, sys.modules['matplotlib'].get_backend().lower())")
    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "agg"]
