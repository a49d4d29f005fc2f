# cxrscale: `make demo` runs the whole pipeline on the built-in sample; `make test` runs the tests.
# Both install first when needed (a second `make install` does nothing).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cxrscale-installed
SAMPLE ?= data/sample
RUN    ?= runs/demo
FINDINGS ?= data/sample-findings
FINDINGS_RUN ?= runs/demo-findings
TUNE   ?= runs/tune-sample
NP     ?= 2

export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install lock demo test bench clean help

help:
	@echo "make install  create $(VENV), install the locked stack (requirements.txt, hash-checked), OpenMPI where it can, build Horovod (once)"
	@echo "make lock     regenerate the lock file requirements.txt from requirements.in (pip-compile, hashes)"
	@echo "make demo     generate the synthetic sample and run the pipeline on it (launch.pipeline --recipe sample)"
	@echo "make test     run the test suite (set CXR_REQUIRE_SHARED_DATA=1 to require ../shared/data)"
	@echo "make bench    run the benchmarks, results under benchmarks/results/"

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg pyproject.toml launch/install_horovod.sh launch/install_mpi.sh
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "cxrscale needs Python 3.11 (TensorFlow 2.21 + Horovod 0.28.1); set PYTHON=/path/to/python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements.txt
	$(PY) -m pip check
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	bash launch/install_mpi.sh
	bash launch/install_horovod.sh $(VENV)
	@$(PY) -c 'import importlib.metadata as m, sys; found = [d for d in ("dask", "distributed") if any(x.metadata["Name"].lower() == d for x in m.distributions())]; sys.exit("Dask (" + ", ".join(found) + ") is installed in $(VENV): its package `distributed` shadows cxrscale`s; pip uninstall " + " ".join(found)) if found else None'
	@touch $@
	@echo "cxrscale installed in $(VENV)"

# The lock: every package pinned with its hashes, from the direct requirements. Run after editing requirements.in;
# pip-tools runs in a venv of its own so that it never enters the locked one.
LOCK_VENV ?= .venv-lock
lock:
	test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet pip-tools==7.6.2
	$(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
		--no-emit-find-links --output-file=requirements.txt requirements.in

demo: install
	$(PY) -m preprocessing.sample --output $(SAMPLE)
	$(PY) -m launch.pipeline --recipe sample --input $(SAMPLE) --output $(RUN) --np $(NP)
	$(PY) -m optimize.prune_quantize --run $(RUN)/final --fine-tune-epochs 1 -q
	$(PY) -m optimize.export --run $(RUN)/final -q
	$(PY) -m optimize.tune --data $(RUN)/prepared --model cnn --search grid --max-epochs 2 --output $(TUNE) -q
	$(PY) -m preprocessing.sample --findings --output $(FINDINGS)
	$(PY) -m launch.pipeline --recipe findings-sample --input $(FINDINGS)/labels.csv --output $(FINDINGS_RUN) --np $(NP)
	@echo "demo: prepared dataset in $(RUN)/prepared; ensemble of two CNNs in $(RUN)/final (calibrated); evaluation report in $(RUN)/final/eval/report.html and model card $(RUN)/final/model_card.md; serving exports (TF Serving, ONNX, TFLite) in $(RUN)/final/export; compressed variants in $(RUN)/final/optimized/report.md; hyper-parameter search in $(TUNE)/report.md; multi-label findings model and its per-finding report in $(FINDINGS_RUN)/final/eval/report.html"

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m benchmarks --suite all --quick

clean:
	rm -rf $(SAMPLE) $(RUN) $(TUNE) $(FINDINGS) $(FINDINGS_RUN) .pytest_cache $(LOCK_VENV)
