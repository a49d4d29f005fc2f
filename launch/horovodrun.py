"""python -m launch.horovodrun: horovodrun itself (Horovod's launcher, `horovod.runner.launch.run_commandline`,
what the `horovodrun` script runs), with its build check answered from launch.local's kept answer.

    python -m launch.horovodrun -np 2 --gloo python -m distributed.train --data prepared/sample --output runs/cnn

Before every job horovodrun asks whether Horovod was built with Gloo (or MPI) by importing horovod.tensorflow,
and with it all of TensorFlow, in a forked child: seconds per launch (docs/launching.md) for an answer that
changes only when Horovod is reinstalled. `launch.local.horovod_build` asks Horovod the same question (the
same *_built() queries) and keeps the answer on disk, keyed by the installed files. The jobs launch.local and
optimize.tune start go through here, so their workers start without that wait. Everything else is
horovodrun's own: its options, output, rendezvous, elastic driver and exit status. When the answer cannot be
had (a broken install), horovodrun asks for itself, and reports what it finds, as it always does.
"""
from __future__ import annotations

import contextlib
import io
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from horovod.runner import launch as runner

    from launch.local import horovod_build

    build = horovod_build()
    if build.get("tensorflow"):
        # run_controller and the elastic path look these names up in horovod.runner.launch at call time
        runner.gloo_built = lambda verbose=False: bool(build.get("gloo"))
        runner.mpi_built = lambda verbose=False: bool(build.get("mpi"))
    sys.argv = ["horovodrun", *(sys.argv[1:] if argv is None else argv)]
    # horovodrun's own parser, asked first with its usage text held back: a mistake is one line, as for every
    # entry point of the toolkit (--help and --version print and exit 0 as horovodrun's do)
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            runner.parse_args()
    except SystemExit as done:
        if done.code in (0, None):
            raise
        last = (held.getvalue().strip().splitlines() or ["bad arguments"])[-1]
        print(f"error: {last.removeprefix('horovodrun: error: ')} (python -m launch.horovodrun --help: "
              "horovodrun's options)", file=sys.stderr)
        return 2
    runner.run_commandline()  # raises on a failed job, as the horovodrun script does
    return 0


if __name__ == "__main__":
    sys.exit(main())
