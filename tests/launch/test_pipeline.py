"""launch.pipeline: recipes load and are checked; a real pipeline (prepare, two members under horovodrun -np 2,
ensemble, evaluate) leaves a final run that predict takes, and a re-run skips what is done."""
from __future__ import annotations

import json
import subprocess

import pytest

from launch.pipeline import load_recipe, plan, recipe_names, with_overrides
from cxrscale.errors import CxrError
from tests.launch.cli import run_in_process, run_module
from tests.training_fixtures import quiet


def test_shipped_recipes_load():
    assert {"kermany-cpu", "kermany-gpu", "sample"} <= set(recipe_names())
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe.description and recipe.train and recipe.member_names()


def test_bad_recipes_and_overrides_are_named(tmp_path):
    with pytest.raises(CxrError, match="no such recipe; shipped recipes: .*kermany-cpu"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 2}\nfit: {}\n")
    with pytest.raises(CxrError, match=r"bad.yaml: unknown keys fit"):
        load_recipe(str(bad))
    bad.write_text("members: [{name: a}, {name: a}]\n")
    with pytest.raises(CxrError, match="member names must differ"):
        load_recipe(str(bad))
    with pytest.raises(CxrError, match="--set 'epochs=3': expected STAGE.OPTION=VALUE"):
        with_overrides(load_recipe("sample"), ["epochs=3"])
    assert with_overrides(load_recipe("sample"), ["train.epochs=3"]).train["epochs"] == 3


def test_gpu_recipe_is_the_thesis_setting_with_mixed_precision(tmp_path):
    p = plan(load_recipe("kermany-gpu"), tmp_path / "in", tmp_path / "out", 4, None)
    assert "--size 224" in " ".join(p.prepare)
    vgg, resnet = p.members["vgg16"], p.members["resnet50"]
    assert vgg[:7] == [vgg[0], "-m", "launch.horovodrun", "-np", "4", "--gloo", "-H"]  # horovodrun, by launch.local
    assert "--precision auto" in " ".join(vgg)
    assert "--model vgg16" in " ".join(vgg) and "--model resnet50" in " ".join(resnet)
    assert "--weights imagenet" in " ".join(resnet) and p.combine and "distributed.ensemble" in p.combine
    # --weights overrides every member's (the members' joined heads: tests/distributed/test_ensemble.py)
    cpu = plan(load_recipe("kermany-gpu"), tmp_path / "in", tmp_path / "out", 1, "none")
    assert all("--weights none" in " ".join(cmd) for cmd in cpu.members.values())


def test_tracking_reaches_every_training_and_the_evaluation(tmp_path):
    uri = "http://127.0.0.1:5000"
    p = plan(load_recipe("kermany-gpu"), tmp_path / "in", tmp_path / "out", 2, None, tracking_uri=uri,
             experiment="kermany")
    for cmd in [*p.members.values(), p.evaluate]:
        assert " ".join(cmd).endswith(f"--tracking-uri {uri} --experiment kermany"), cmd
    assert "--tracking-uri" not in " ".join(p.prepare + (p.combine or []))
    assert "--tracking-uri" not in " ".join(plan(load_recipe("sample"), tmp_path, tmp_path / "o", 1, None).evaluate)


def small_recipe(path, members: int = 2):
    lines = ["description: a small test recipe", "prepare: {size: 64, shards: 4, workers: 1}",
             "train: {model: cnn, epochs: 1, batch_size: 16, augment: true, schedule: cosine}", "members:"]
    lines += [f"  - {{name: s{i}, seed: {i}}}" for i in range(members)]
    lines += ["evaluate: {bootstrap: 50, no_gradcam: true}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def pipeline(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return run_module("launch.pipeline", *args, timeout=timeout)


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_resumes_stage_by_stage(sample_images, tmp_path):
    recipe = small_recipe(tmp_path / "small.yaml")
    out = tmp_path / "out"
    # one worker per member: the horovodrun commands a larger --np makes are test_gpu_recipe_is_...'s
    args = ["--recipe", str(recipe), "--input", str(sample_images), "--output", str(out), "--np", "1"]
    first = pipeline(*args)
    assert first.returncode == 0, quiet(first.stderr)
    assert "final model:" in first.stdout and "threshold" in first.stdout
    record = json.loads((out / "pipeline.json").read_text())
    assert set(record["stages"]) == {"prepare", "train:s0", "train:s1", "combine", "evaluate"}
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["ensemble"]["seeds"] == [0, 1]
    assert json.loads((out / "members" / "s0" / "config.json").read_text())["resolved"]["workers"] == 1
    metrics = json.loads((out / "final" / "eval" / "metrics.json").read_text())
    assert metrics["threshold"]["chosen_on"] == "val" and metrics["calibration"]["method"] == "temperature"
    assert record["final"]["threshold"] == metrics["threshold"]["value"]

    predicted = run_in_process("distributed.predict", "--run", str(out / "final"),
                               str(sample_images / "train" / "NORMAL"), "--format", "json")
    assert predicted.returncode == 0, quiet(predicted.stderr)
    assert f"{metrics['threshold']['value']:.4f}" in predicted.stderr  # the final run's own threshold

    again = pipeline(*args)
    assert again.returncode == 0, quiet(again.stderr)
    assert again.stderr.count("already done") == 5
    import shutil

    shutil.rmtree(out / "final")  # as if the job died during the ensemble stage
    resumed = pipeline(*args)
    assert resumed.returncode == 0, quiet(resumed.stderr)
    assert resumed.stderr.count("already done") == 3  # prepare and both members
    changed = pipeline(*args[:-1], "2")
    assert changed.returncode == 2 and "other settings (np)" in changed.stderr


def test_bad_input_is_one_line(tmp_path):
    result = pipeline("--recipe", "sample", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "--input" in result.stderr and "does not exist" in result.stderr
