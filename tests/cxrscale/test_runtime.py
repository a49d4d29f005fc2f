"""cxrscale: the plumbing every entry point shares (atomic folders, the rank-aware CLI runner, the quiet
console), exercised as a user meets it: through real processes."""
from __future__ import annotations

import os
import subprocess
import textwrap

import pytest

from cxrscale.console import is_start_up_noise
from cxrscale.files import atomic_dir
from tests.conftest import PYTHON, REPO


def test_atomic_dir_replaces_a_folder_in_one_step_and_keeps_it_on_failure(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("CXR_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")}
    return subprocess.run([PYTHON, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**full, **env})


MISTAKE = """
    from cxrscale.cli import run_cli
    from cxrscale.errors import CxrError
    def main(argv):
        raise CxrError("--data prepared/x not found")
    run_cli(main)
"""


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_a_user_mistake_is_one_line_on_rank_0_only(rank, shown):
    result = _run(MISTAKE, HOROVOD_RANK=rank)
    assert result.returncode == 2
    assert result.stderr.splitlines() == (["error: --data prepared/x not found"] if shown else [])


def test_ctrl_c_keeps_what_was_done_and_exits_130():
    result = _run("""
        from cxrscale.cli import run_cli
        def main(argv):
            raise KeyboardInterrupt
        run_cli(main)
    """)
    assert result.returncode == 130 and result.stderr.startswith("interrupted: what was finished is kept")


def test_tensorflow_starts_quietly_unless_verbose():
    code = """
        import sys
        from distributed.model.kerasenv import keras
        import tensorflow as tf
        tf.config.list_physical_devices()
        print("a line of our own", file=sys.stderr)
    """
    quiet = _run(code)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.splitlines() == ["a line of our own"]
    loud = _run(code, CXR_VERBOSE="1")
    assert loud.returncode == 0 and any(is_start_up_noise(line) for line in loud.stderr.splitlines()), loud.stderr


def test_an_entry_point_that_loads_tensorflow_prints_one_error_line(tmp_path):
    result = subprocess.run([PYTHON, "-m", "distributed.evaluate", "--run", str(tmp_path / "missing")], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "CXR_VERBOSE"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: run folder not found: {tmp_path / 'missing'}"]


def test_run_quietly_passes_on_everything_but_tensorflows_start_up_lines():
    child = ("import sys; sys.stderr.write('WARNING: All log messages before absl::InitializeLog() is called are "
             "written to STDERR\\nI0000 00:00:1796130190.945559   12384 port.cc:153] oneDNN custom operations are "
             "on.\\nfully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, output_inference_type: "
             "FLOAT32\\nINFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\nreal problem\\n')")
    result = _run(f"""
        import sys
        from cxrscale.console import run_quietly
        sys.exit(run_quietly([sys.executable, "-c", {child!r}]))
    """)
    assert result.returncode == 0 and result.stderr.splitlines() == ["real problem"]


ENTRY_POINTS = ["preprocessing", "preprocessing.sample", "distributed.train", "distributed.evaluate",
                "distributed.predict", "distributed.ensemble", "distributed.adapt", "optimize.prune_quantize",
                "optimize.export",
                "optimize.tune", "launch.cli",
                "launch.local", "launch.slurm", "launch.kubernetes", "launch.hostfile", "launch.pipeline", "launch.ray",
                "benchmarks", "benchmarks.preprocess", "benchmarks.train", "benchmarks.optimize",
                "benchmarks.complexity", "benchmarks.scaling", "benchmarks.robustness", "benchmarks.serving",
                "benchmarks.faults", "benchmarks.input", "benchmarks.trust", "benchmarks.shift", "benchmarks.split",
                "benchmarks.members"]


def test_every_entry_point_answers_version():
    """`--version` on every entry point, all in one process (each as `python -m MODULE --version` runs it), and
    on the installed `cxrscale` command. None of them loads TensorFlow to answer: its start-up (seconds) comes
    after the command line is read, so --help, --version and a mistake in the options answer at once."""
    from cxrscale import __version__

    code = textwrap.dedent(f"""
        import contextlib, io, runpy, sys
        for module in {ENTRY_POINTS!r}:
            sys.argv, out = [module, "--version"], io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as done:
                assert done.code in (0, None), (module, done.code)
            else:
                raise AssertionError(module + " did not exit on --version")
            print(module, out.getvalue().strip())
        print("tensorflow", "tensorflow" in sys.modules)
        """)
    result = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines.pop("tensorflow") == "False"
    assert lines == {module: f"cxrscale {__version__}" for module in ENTRY_POINTS}
    command = subprocess.run([os.path.join(os.path.dirname(PYTHON), "cxrscale"), "--version"], capture_output=True,
                             text=True)
    assert command.returncode == 0 and command.stdout.strip() == f"cxrscale {__version__}"


def test_every_entry_point_reports_a_bad_flag_in_one_line():
    """Every entry point, each in its own process: a wrong command line (a flag that does not exist, or a
    required one missing) is one `error:` line naming an option, exit status 2, and under a launcher only
    rank 0 prints it."""
    from concurrent.futures import ThreadPoolExecutor

    env = {k: v for k, v in os.environ.items() if k != "CXR_VERBOSE"}

    def bad_flag(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", module, "--no-such-flag"], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env=env)

    with ThreadPoolExecutor(2) as pool:  # two processes at a time: most of each is importing its libraries
        results = list(pool.map(bad_flag, ENTRY_POINTS))
    for module, result in zip(ENTRY_POINTS, results):
        assert result.returncode == 2, (module, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "--" in lines[0], (module, lines)
    silent = _run("from distributed.training.config import build_parser; build_parser().parse_args(['--no-such-flag'])",
                  HOROVOD_RANK="1")
    assert silent.returncode == 2 and silent.stderr == ""


def test_an_entry_points_config_is_its_parsers_namespace_frozen():
    import argparse
    import dataclasses

    from cxrscale.cli import config_from

    @dataclasses.dataclass(frozen=True)
    class Config:
        data: str
        sizes: tuple[int, ...] = ()

    parser = argparse.ArgumentParser()
    parser.add_argument("--data")
    parser.add_argument("--sizes", type=int, nargs="+", default=[])
    config = config_from(Config, parser.parse_args(["--data", "x", "--sizes", "1", "2"]))
    assert config == Config("x", (1, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data = "y"
    parser.add_argument("--extra")
    with pytest.raises(TypeError, match=r"flags without a field \['extra'\]"):
        config_from(Config, parser.parse_args([]))
