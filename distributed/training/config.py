"""Training configuration: one frozen dataclass, one flag per field, optionally seeded from a JSON/YAML file."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cxrscale import tracking
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser
from cxrscale.files import read_options_file
from distributed.model.zoo import model_names, model_spec

PRECISIONS = ("auto", "fp32", "mixed_float16", "mixed_bfloat16")
SCHEDULES = ("plateau", "cosine")
# calibration.METHODS, without TensorFlow (tests/distributed/model/test_calibration.py checks they agree)
CALIBRATIONS = ("auto", "temperature", "platt", "isotonic", "none")
BACKENDS = ("horovod", "tf")  # distributed.training.backends.BACKENDS, without TensorFlow


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `python -m distributed.train`. lr is the base learning rate of ONE worker; the
    optimizer uses lr x (number of workers), reached by a linear warm-up over warmup_epochs."""

    data: str
    output: str = ""
    model: str = "cnn"
    weights: str = "auto"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    warmup_epochs: float = 1.0
    precision: str = "auto"
    xla: bool = False
    freeze_base: bool = False
    fine_tune_from: str | None = None
    augment: bool = False
    augment_aspect: float | None = None
    augment_zoom: float | None = None
    class_weights: str = "auto"
    cache_features: bool = False
    resume: bool = False
    seed: int = 0
    dropout: float | None = None
    l2: float = 1e-4
    early_stopping_patience: int = 5
    reduce_lr_patience: int = 2
    shuffle_buffer: int = 1024
    bn_samples: int = 1024
    calibration: str = "auto"
    label_smoothing: float = 0.0
    mixup: float = 0.0
    schedule: str = "plateau"
    ema: float = 0.99
    elastic: bool = False
    commit_every: int = 20
    backend: str = "horovod"
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT

    def resolved_output(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / Path(self.data).resolve().name

    def resolved_weights(self) -> str:
        if self.weights != "auto":
            return self.weights
        return "imagenet" if model_spec(self.model).imagenet else "none"

    def model_options(self) -> dict[str, Any]:
        """The keyword arguments of `build_model` this config sets (a model without ImageNet weights trains
        whole: no freezing)."""
        options: dict[str, Any] = {"l2": self.l2}
        if self.dropout is not None:
            options["dropout"] = self.dropout
        if model_spec(self.model).imagenet:
            options.update(freeze_base=self.freeze_base, fine_tune_from=self.fine_tune_from)
        return options

    def validate(self) -> None:
        checks = [
            (self.model in model_names(), f"--model must be one of {', '.join(model_names())}, got {self.model!r}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.class_weights in ("auto", "none"), "--class-weights must be auto or none"),
            (self.dropout is None or 0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.l2 >= 0, f"--l2 must be >= 0, got {self.l2}"),
            (self.calibration in CALIBRATIONS,
             f"--calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.augment_aspect is None or self.augment_aspect >= 1,
             f"--augment-aspect must be at least 1 (R: the crop's aspect ratio from 1/R to R), got "
             f"{self.augment_aspect}"),
            (self.augment_aspect is None or self.augment,
             "--augment-aspect sets a range of --augment's random crop: give --augment as well"),
            (self.augment_zoom is None or self.augment_zoom >= 1,
             f"--augment-zoom must be at least 1 (Z: the crop's side from 1/Z to Z of the image's), got "
             f"{self.augment_zoom}"),
            (self.augment_zoom is None or self.augment,
             "--augment-zoom sets a range of --augment's random crop: give --augment as well"),
            (self.mixup >= 0, f"--mixup must be 0 (off) or a positive Beta parameter, got {self.mixup}"),
            (not (self.mixup and self.cache_features),
             "--mixup mixes images and --cache-features trains on features computed once per image: choose one"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.ema == 0 or 0.5 <= self.ema < 1, f"--ema must be 0 (off) or in [0.5, 1), got {self.ema}"),
            (self.bn_samples >= 0, f"--bn-samples must be >= 0, got {self.bn_samples}"),
            (self.commit_every >= 1, f"--commit-every must be at least 1 batch, got {self.commit_every}"),
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
            (not (self.elastic and self.backend == "tf"),
             "--elastic is Horovod's (hvd.elastic: a job that loses or gains workers and goes on); tf.distribute "
             "has no elastic mode, its jobs restart from the last checkpoint (--resume): use --backend horovod"),
            (not (self.elastic and self.cache_features),
             "--elastic re-plans each worker's data at every change of size, which --cache-features (features "
             "computed once per worker) cannot follow: leave one of them out"),
            (not (self.cache_features and self.augment),
             "--cache-features computes each image's features once, so it cannot be combined with --augment"),
            (not self.cache_features or self.model not in model_names() or model_spec(self.model).imagenet,
             "--cache-features needs a frozen pretrained backbone: use it with a model with ImageNet weights ("
             + ", ".join(n for n in model_names() if model_spec(n).imagenet) + ")"),
            (not self.cache_features or (self.freeze_base and not self.fine_tune_from),
             "--cache-features needs the whole backbone frozen: add --freeze-base (and no --fine-tune-from)"),
        ]
        for ok, message in checks:
            if not ok:
                raise CxrError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str) -> dict[str, Any]:
    """Options from a JSON or YAML file (as `optimize.tune` writes its best config); keys are field names."""
    data = read_options_file(path, "--config")
    if not isinstance(data, dict):
        raise CxrError(f"--config {path} must hold a mapping of option names to values")
    data = data.get("config", data)  # accept a run's config.json too
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CxrError(f"--config {path} has unknown options: {', '.join(unknown)}")
    return data


def build_parser(prog: str = "python -m distributed.train") -> argparse.ArgumentParser:
    d = TrainConfig(data="")
    p = OneLineParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Data-parallel training of a chest X-ray classifier with Horovod (one worker without "
                    "horovodrun).",
        epilog="examples:\n"
               "  python -m distributed.train --data prepared/sample --model cnn --epochs 3\n"
               "  horovodrun -np 4 python -m distributed.train --data prepared/kermany --model resnet50 "
               "--batch-size 32 --epochs 20\n"
               "  horovodrun -np 2 python -m distributed.train --data prepared/kermany --model vgg16 "
               "--freeze-base --cache-features\n"
               "  python -m distributed.train --data prepared/kermany --output runs/kermany --resume\n"
               "  horovodrun -np 2 --min-np 1 --max-np 4 --host-discovery-script ./discover_hosts.sh "
               "python -m distributed.train --elastic --data prepared/kermany\n"
               "  python -m distributed.train --data prepared/kermany --config runs/tune-kermany/best_config.json\n"
               "  horovodrun -np 2 python -m distributed.train --data prepared/kermany --tracking-uri "
               "http://127.0.0.1:5000")
    p.add_argument("--config", help="JSON/YAML file of options (e.g. a tuning result); flags override it")
    p.add_argument("--data", help="prepared dataset folder (from python -m preprocessing)")
    p.add_argument("--output", default=None, help="run folder to write (default runs/<data folder name>)")
    p.add_argument("--model", choices=model_names(), default=None,
                   help="architecture: " + "; ".join(f"{n}, {model_spec(n).summary}" for n in model_names())
                   + f" (default {d.model})")
    p.add_argument("--weights", default=None,
                   help="imagenet | none | PATH to a weights file (default: imagenet for models that have ImageNet "
                        "weights, none for the others)")
    p.add_argument("--epochs", type=int, default=None, help=f"maximum epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=None, help=f"per-worker batch (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"base learning rate of one worker, scaled by the worker count (default {d.lr})")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"linear warm-up from lr to lr x workers (default {d.warmup_epochs})")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="auto = mixed_float16 on GPUs, fp32 on CPU (default auto)")
    p.add_argument("--xla", action="store_true", default=None, help="jit-compile the train step with XLA")
    p.add_argument("--freeze-base", action="store_true", default=None, help="train the head only")
    p.add_argument("--fine-tune-from", default=None, help="backbone layer from which on layers train")
    p.add_argument("--augment", action="store_true", default=None,
                   help="anatomy-safe augmentation of training images: random resized crop, rotation +-5 deg, gamma, "
                        "brightness, contrast, blur and noise; never a left-right flip")
    p.add_argument("--augment-aspect", type=float, default=None, metavar="R",
                   help="with --augment: draw the random crop's aspect ratio from 1/R..R, so that the anatomy is "
                        "stretched or squeezed by up to sqrt(R) (default: 0.9..1.1). Kermany's originals differ in "
                        "aspect ratio by class, which a square resize turns into a class-wise squeeze "
                        "(docs/training.md)")
    p.add_argument("--augment-zoom", type=float, default=None, metavar="Z",
                   help="with --augment: draw the random crop's side from 1/Z..Z of the image's, so that the anatomy "
                        "is shown up to Z times larger or smaller, black around it when smaller (default: 0.8..1.0, "
                        "larger only). A field of view that differs by site then reads as no class (docs/training.md)")
    p.add_argument("--class-weights", choices=("auto", "none"), default=None,
                   help="auto: weight classes inversely to their train counts (default auto)")
    p.add_argument("--cache-features", action="store_true", default=None,
                   help="frozen backbone: compute its features once and train the head on them")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="how workers cooperate: horovod (horovodrun, launch.local, Slurm, MPI; elastic) or tf "
                        "(tf.distribute.MultiWorkerMirroredStrategy: each worker's TF_CONFIG from launch.local "
                        "--backend tf, Ray Train or the Kubernetes operator, or Slurm's srun; docs/training.md) "
                        f"(default {d.backend})")
    p.add_argument("--elastic", action="store_true", default=None,
                   help="Horovod elastic training (run under horovodrun --min-np/--max-np --host-discovery-script): "
                        "survives a lost worker or host and grows when one joins (docs/training.md)")
    p.add_argument("--commit-every", type=int, default=None,
                   help=f"--elastic: commit the training state every this many batches (and at every epoch end); "
                        f"a lost worker costs at most that many (default {d.commit_every})")
    p.add_argument("--seed", type=int, default=None, help=f"random seed (default {d.seed})")
    p.add_argument("--dropout", type=float, default=None, help="dropout rate of the head (default: the model's)")
    p.add_argument("--l2", type=float, default=None, help=f"L2 factor on dense layers (default {d.l2})")
    p.add_argument("--early-stopping-patience", type=int, default=None)
    p.add_argument("--reduce-lr-patience", type=int, default=None)
    p.add_argument("--shuffle-buffer", type=int, default=None)
    p.add_argument("--label-smoothing", type=float, default=None,
                   help=f"smooth the training targets by this amount (default {d.label_smoothing})")
    p.add_argument("--mixup", type=float, default=None,
                   help="mixup (Zhang et al. 2018): train on pairs of images and labels blended with weights drawn "
                        "from Beta(X, X), after --augment; two classes or multi-label; 0 turns it off "
                        f"(default {d.mixup})")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="learning rate: plateau = constant after the warm-up, halved when val AUC stalls; cosine = "
                        f"linear warm-up then cosine decay to 1 %% at the last epoch (default {d.schedule})")
    p.add_argument("--ema", type=float, default=None,
                   help="validate, checkpoint and export an exponential moving average of the weights with this "
                        f"decay per step, warmed up over the first steps; 0 turns it off (default {d.ema})")
    p.add_argument("--calibration", choices=CALIBRATIONS, default=None,
                   help="probability calibration fitted on the validation split and built into the exported model; "
                        f"auto = temperature, which keeps the balanced prior of class weighting and survives a "
                        f"shifted site better than platt's offset (default {d.calibration})")
    p.add_argument("--bn-samples", type=int, default=None,
                   help="train images over which BatchNormalization statistics are re-estimated after every epoch, "
                        f"dropout off, across all workers (0 keeps Keras's moving averages; default {d.bn_samples})")
    tracking.add_arguments(p, "the run (rank 0 alone)", experiment_default=None)
    return p


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags over the --config file over the defaults."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_config_file(args.config))
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    if not values.get("data"):
        raise CxrError("--data is required: the prepared dataset folder (python -m preprocessing --output ...)")
    config = TrainConfig(**values)
    config.validate()
    return config
