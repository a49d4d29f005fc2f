"""python -m distributed.ensemble: several trained runs as one model, in a run folder of its own.

    python -m distributed.ensemble --runs runs/cnn-s0 runs/cnn-s1 runs/cnn-s2 --output runs/cnn-ensemble

The members (other seeds, or other models on the same prepared dataset) are joined into one flat Keras graph:
one uint8 input, every member's layers (renamed m0_..., m1_...) up to its logits, the mean of the logits,
then a calibration fitted on the validation split of the whole ensemble. The output folder is a complete
run: `distributed.evaluate --run`, `distributed.predict --run` and `optimize.prune_quantize --run` take it as
they take a single run, and its exported model is self-contained (pixels in, calibrated probability out).
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from distributed.model.heads import Head
from distributed.model.scoring import read_run_config, run_model_path
from distributed.training.config import CALIBRATIONS
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from cxrscale.files import atomic_dir, check_writable_dir, write_json_atomic
from cxrscale.provenance import git_commit, library_versions
from preprocessing import schema

if TYPE_CHECKING:
    from distributed.model.kerasenv import keras

log = logging.getLogger("cxrscale.ensemble")



def join_members(models: Sequence[keras.Model]) -> keras.Model:
    """One flat model averaging the members' logits: (n, H, W, C) uint8 -> mean logits (n, units).

    Each member is cloned onto a shared input with its layers renamed MEMBER_PREFIX + name (weights copied),
    its calibration layers dropped. Binary members with different heads (VGG16's 2-unit softmax, ResNet50's
    sigmoid) are averaged on the positive-class logit; multi-label members finding by finding. The result
    ends in a layer named `logits` (the mean), so calibration, evaluation and the optimize stage treat it
    like a single model."""
    from distributed.model.kerasenv import keras  # first: chooses tf_keras before TensorFlow loads
    from distributed.model.builders import LOGITS_NAME, LOGIT_DIFFERENCE_NAME, MEAN_LOGITS_NAME, MEMBER_PREFIX
    from distributed.model.calibration import logits_model

    shapes = {tuple(m.input_shape[1:]) for m in models}
    heads = [Head.of_logits(m) for m in models]
    # binary heads mix: a sigmoid unit's logit and a 2-unit softmax's z1 - z0 are the same quantity
    mixed_binary = all(h.binary for h in heads) and len(set(heads)) > 1
    if len(shapes) != 1 or (len(set(heads)) != 1 and not mixed_binary):
        kinds = ", ".join(sorted({h.describe() for h in heads}))
        raise CxrError(f"the members take inputs {sorted(shapes)} and have {kinds} heads: an ensemble needs one "
                       "input shape and one kind of head (the same prepared dataset)")
    shape = shapes.pop()
    image = keras.Input(shape, dtype=models[0].inputs[0].dtype, name="image")
    member_logits = []
    for k, model in enumerate(models):
        core = logits_model(model)
        prefix = MEMBER_PREFIX.format(k)

        def rename(layer, prefix=prefix):
            config = layer.get_config()
            config["name"] = prefix + layer.name
            return layer.__class__.from_config(config)

        clone = keras.models.clone_model(core, input_tensors=image, clone_function=rename)
        for layer in clone.layers:
            if layer.name.startswith(prefix) and layer.weights:
                layer.set_weights(core.get_layer(layer.name[len(prefix):]).get_weights())
        z = clone.outputs[0]
        if mixed_binary and heads[k].units == 2:
            difference = keras.layers.Dense(1, use_bias=False, trainable=False, dtype="float32",
                                            name=f"{prefix}{LOGIT_DIFFERENCE_NAME}",
                                            kernel_initializer=keras.initializers.Constant([[-1.0], [1.0]]))
            z = difference(z)
        member_logits.append(z)
    mean = keras.layers.Average(name=MEAN_LOGITS_NAME, dtype="float32")(member_logits) if len(models) > 1 \
        else member_logits[0]
    logits = keras.layers.Activation("linear", name=LOGITS_NAME, dtype="float32")(mean)
    return keras.Model(image, logits, name=f"ensemble_of_{len(models)}")


def build_ensemble(run_dirs: Sequence[Path], output: Path, method: str) -> dict[str, Any]:
    """Check the members, join them, fit `method` on the validation split, write the ensemble run folder."""
    if len(run_dirs) < 2:
        raise CxrError("--runs needs at least two training runs to ensemble")
    configs = [read_run_config(r) for r in run_dirs]
    hashes = {c.get("manifest_sha256") for c in configs}
    if len(hashes) != 1:
        raise CxrError("the --runs were trained on different prepared datasets (their manifests differ): an "
                       "ensemble is calibrated and evaluated on one dataset")
    data_dir = Path(configs[0]["config"]["data"])
    if not (data_dir / schema.MANIFEST).is_file():
        raise CxrError(f"the members' dataset {data_dir} (from {run_dirs[0] / 'config.json'}) is not here")
    check_writable_dir(output, "--output")
    if (output / "model").exists():
        raise CxrError(f"--output {output} already holds a model; choose another folder")

    # TensorFlow loads here, after the checks that need none: a mistake is reported without its start-up
    from distributed.model.kerasenv import keras  # first: chooses tf_keras before TensorFlow loads
    from distributed.model.calibration import calibrated_model, fit_on_validation

    members = [keras.models.load_model(str(run_model_path(r)), compile=False) for r in run_dirs]
    joined = join_members(members)
    log.info("joined %d members: %d layers, %d parameters", len(members), len(joined.layers), joined.count_params())
    output.mkdir(parents=True, exist_ok=True)
    head = Head(Head.of_logits(members[0]).kind, int(joined.outputs[0].shape[-1]))  # of the mean logits
    calibration = fit_on_validation(joined, data_dir, method, output, head=head)  # OUTPUT/calibration.json
    final = calibrated_model(joined, calibration, head=head)

    models = sorted({c["config"]["model"] for c in configs})
    first = configs[0]
    meta = {"config": {**first["config"], "model": models[0] if len(models) == 1 else first["config"]["model"],
                       "output": str(output), "calibration": method},
            "resolved": {**first["resolved"], "output": str(output)},
            "ensemble": {"members": [str(r) for r in run_dirs], "models": [c["config"]["model"] for c in configs],
                         "seeds": [c["config"].get("seed") for c in configs], "combine": "mean of logits"},
            "head": Head.of_model(final).to_dict(),
            "libraries": library_versions(("tensorflow", "tf-keras", "numpy", "cxrscale")),
            "git_commit": git_commit(), "manifest_sha256": first.get("manifest_sha256")}
    with atomic_dir(output / "model") as tmp:  # the model lands last: its presence means a finished ensemble
        final.save(str(tmp))
        write_json_atomic(output / "config.json", meta)
        shutil.copyfile(Path(run_dirs[0]) / "dataset_manifest.json", output / "dataset_manifest.json")
    return meta


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m distributed.ensemble", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example:\n  python -m distributed.ensemble --runs runs/cnn-s0 runs/cnn-s1 "
                                            "runs/cnn-s2 --output runs/cnn-ensemble\n"
                                            "  python -m distributed.evaluate --run runs/cnn-ensemble")
    parser.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="training run folders (2 or more)")
    parser.add_argument("--output", required=True, help="the ensemble's run folder to write")
    parser.add_argument("--calibration", choices=CALIBRATIONS, default="auto",
                        help="calibration fitted on the validation split of the whole ensemble; auto = temperature "
                             "(default auto)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    build_ensemble([Path(r) for r in args.runs], Path(args.output), args.calibration)
    print(f"ensemble of {len(args.runs)} runs in {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
