"""cxrscale COMMAND [ARGS]: every entry point of the toolkit as one installed command.

    cxrscale prepare --input ~/chest_xray --output prepared/kermany
    cxrscale train --data prepared/kermany --model cnn --output runs/kermany-cnn
    horovodrun -np 4 cxrscale train --data prepared/kermany --model resnet50 --output runs/resnet50

`cxrscale NAME ARGS` is `python -m MODULE ARGS` (the table below), with the same options, help and exit
statuses; use whichever form you like. The wheel installs this command (pip install cxrscale-*.whl).
"""
from __future__ import annotations

import runpy
import sys
from typing import Sequence

from cxrscale.cli import version_line

# command -> (module run as `python -m MODULE`, what it does)
COMMANDS = {
    "sample": ("preprocessing.sample", "write the synthetic sample dataset"),
    "prepare": ("preprocessing", "prepare radiographs into patient-grouped, sharded TFRecords"),
    "train": ("distributed.train", "train a model (under horovodrun, mpirun or srun for several workers; or "
                                   "tf.distribute: --backend tf)"),
    "evaluate": ("distributed.evaluate", "evaluate a run: metrics with intervals, report, model card"),
    "predict": ("distributed.predict", "classify radiographs with a run or an exported model"),
    "ensemble": ("distributed.ensemble", "join trained runs into one calibrated model"),
    "adapt": ("distributed.adapt", "adapt a run to a new site with its own images (calibration, threshold, AdaBN)"),
    "compress": ("optimize.prune_quantize", "prune and quantize a run, measure the variants"),
    "export": ("optimize.export", "export a run for TF Serving, ONNX Runtime/Triton and LiteRT"),
    "tune": ("optimize.tune", "search hyper-parameters with Ray Tune"),
    "pipeline": ("launch.pipeline", "run the whole pipeline from a recipe"),
    "local": ("launch.local", "check and start a Horovod (or tf.distribute) job on this machine or a host list"),
    "slurm": ("launch.slurm", "write (and submit) a Slurm batch script"),
    "kubernetes": ("launch.kubernetes", "write an MPI-operator MPIJob (or a TFJob) manifest"),
    "ray": ("launch.ray", "train on a Ray cluster with Ray Train (tf.distribute workers)"),
    "hostfile": ("launch.hostfile", "host lists and discovery scripts for Horovod"),
    "bench": ("benchmarks", "run the benchmark suites"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}  (python -m {module})" for name, (module, what) in COMMANDS.items())
    return f"{__doc__.strip()}\n\ncommands:\n{rows}\n\n`cxrscale COMMAND --help` tells a command's options.\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        raise SystemExit(0 if args else 2)
    if args[0] == "--version":
        print(version_line())
        raise SystemExit(0)
    if args[0] not in COMMANDS:
        sys.stderr.write(f"error: unknown command {args[0]!r}; one of {', '.join(COMMANDS)} (see cxrscale --help)\n")
        raise SystemExit(2)
    module = COMMANDS[args[0]][0]
    sys.argv = [f"cxrscale {args[0]}", *args[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # exactly `python -m MODULE ARGS`


if __name__ == "__main__":
    main()
