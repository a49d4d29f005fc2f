"""One log format for the whole toolkit, and a quiet console: the libraries' routine chatter and
TensorFlow's native start-up lines are held back unless CXR_VERBOSE=1."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Iterator, Sequence

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


# Libraries whose Python loggers narrate routine work (absl: "Sharding callback duration" every epoch;
# tensorflow: "Assets written to", twice through its own handler; tf2onnx: every conversion step): warnings only,
# unless CXR_VERBOSE=1.
CHATTY_LOGGERS = {"absl": logging.WARNING, "tensorflow": logging.ERROR, "h5py": logging.WARNING,
                  "tf2onnx": logging.WARNING}


def verbose() -> bool:
    """CXR_VERBOSE=1: show the libraries' own start-up and progress messages too."""
    return os.environ.get("CXR_VERBOSE", "") not in ("", "0")


def setup_logging(level: int = logging.INFO) -> None:
    """One log format for the whole toolkit; safe to call more than once."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr)
    root.setLevel(level)
    if not verbose():
        for name, floor in CHATTY_LOGGERS.items():
            logging.getLogger(name).setLevel(max(floor, level))


# TensorFlow's native chatter: its start-up lines, logged before absl::InitializeLog(), where abseil ignores
# TF_CPP_MIN_LOG_LEVEL (abseil/abseil-cpp#1718), the TFLite calibrator's printf per quantized model and the
# interpreter's note on its first allocation. The
# only way to keep them off the console is to catch the process's native stderr while TensorFlow loads,
# probes for devices or quantizes, and to pass on everything else.
_START_UP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWE]\d{4} [\d:. ]+\d+ (port|cudart_stub|cpu_feature_guard|cuda_platform|cuda_executor|cuda_dnn|cuda_fft"
    r"|cuda_blas|gpu_device)\.cc:\d+\] .*"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow .*"
    r"|fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, output_inference_type: \w+"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.)$")


@contextlib.contextmanager
def quiet_tensorflow() -> Iterator[None]:
    """Hold back TensorFlow's native chatter (`is_start_up_noise`) written to file descriptor 2 inside the
    block (unless CXR_VERBOSE=1); every other line is written to stderr afterwards, in order."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines()
                    if not _START_UP_NOISE.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def is_start_up_noise(line: str) -> bool:
    """Whether a line of a child process's stderr is one of TensorFlow's native start-up lines."""
    return bool(_START_UP_NOISE.match(line.rstrip("\n")))


def run_quietly(cmd: Sequence[str], env: dict | None = None, keep: Callable[[str], bool] | None = None) -> int:
    """Run `cmd` with this process's stdin and stdout, passing its stderr on line by line without
    TensorFlow's start-up lines (horovodrun's own process imports TensorFlow) nor those `keep` refuses (it
    sees every line); returns its exit status."""
    proc = subprocess.Popen(list(cmd), env=env, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    assert proc.stderr is not None
    for line in proc.stderr:
        kept = keep(line) if keep else True
        if verbose() or (kept and not is_start_up_noise(line)):
            sys.stderr.write(line)
            sys.stderr.flush()
    return proc.wait()

