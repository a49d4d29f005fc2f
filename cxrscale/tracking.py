"""MLflow tracking for every stage: off unless `--tracking-uri` is given; one process writes; never in the way.

    --tracking-uri mlruns                 an embedded store in a folder (SQLite, no server)
    --tracking-uri http://127.0.0.1:5000  a tracking server (`mlflow server ...`)

What is logged where (docs/tracking.md): train logs the resolved config as params, every epoch's metrics, and
the exported model and run records as artifacts, into one MLflow run whose id it keeps in RUN/tracking.json
(a resumed or elastic run goes on in the same MLflow run); evaluate adds the final metrics with their
intervals and the reports to that run (or to a run of its own for a bare model); optimize logs each variant
as a child run; tune logs every trial through Ray Tune's MLflow integration. Every run is tagged with the git
commit and the dataset manifest's sha256.

A tracking failure never stops the work: the first one logs a single warning, and that tracker goes quiet.
An unreachable server is found by a health check of a few seconds before anything is logged.
"""
from __future__ import annotations

import logging
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

from cxrscale import __version__
from cxrscale.files import read_json, sha256_file, write_json_atomic
from cxrscale.provenance import git_commit

log = logging.getLogger("cxrscale.tracking")

DEFAULT_EXPERIMENT = "cxrscale"
RECORD = "tracking.json"  # RUN/tracking.json: the training run's MLflow run
_SCHEMES = ("file", "http", "https", "sqlite", "postgresql", "mysql", "databricks")
# Fail fast instead of MLflow's default of 7 retries with backoff (minutes of stalled training per call).
_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
HEALTH_TIMEOUT = 5.0
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def add_arguments(parser, what: str = "this run", experiment_default: str | None = DEFAULT_EXPERIMENT) -> None:
    """--tracking-uri and --experiment, the same on every entry point (distributed.train's flags default to
    None, so that a --config file can set them)."""
    parser.add_argument("--tracking-uri", default=None, type=resolve_uri,
                        help=f"log {what} to MLflow: a folder such as mlruns (an embedded SQLite store), or a "
                             "tracking server's http(s):// URL (default: off; docs/tracking.md)")
    parser.add_argument("--experiment", default=experiment_default,
                        help=f"MLflow experiment to log into (default {DEFAULT_EXPERIMENT})")


def resolve_uri(text: str) -> str:
    """A --tracking-uri as MLflow takes it. A folder (or file:FOLDER) becomes an embedded SQLite store in it,
    FOLDER/mlflow.db with the artifacts in FOLDER/artifacts: MLflow 3 keeps its plain-file store in maintenance
    mode and refuses it by default. Paths are made absolute (horovodrun workers and Ray trials start elsewhere);
    server and database URIs are kept. argparse type: errors name the option."""
    import argparse

    text = text.strip()
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme in ("file", ""):
        path = text[5:] if scheme == "file" else text
        path = path[2:] if path.startswith("//") else path
        return f"sqlite:///{Path(path).expanduser().resolve() / 'mlflow.db'}"
    if scheme.split("+")[0] not in _SCHEMES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a folder, file:PATH or an http(s):// MLflow server "
                                         f"(schemes: {', '.join(_SCHEMES)})")
    return text.rstrip("/")


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def experiment_id(client, uri: str, name: str) -> str:
    """The id of experiment `name`, created when missing (in an embedded SQLite store, with its artifacts in
    the artifacts folder beside the database rather than wherever the process happens to run)."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    database = _sqlite_file(uri)
    location = (database.parent / "artifacts").as_uri() if database else None
    return client.create_experiment(name, artifact_location=location)


def first_line(err: BaseException) -> str:
    """A tracking failure in one line for the one warning: its message's first line, or its type."""
    return str(err).splitlines()[0][:300] if str(err) else type(err).__name__


def fail_fast() -> None:
    """MLflow's HTTP client set to give up within seconds (the user's own MLFLOW_HTTP_* settings win)."""
    for key, value in _CLIENT_ENV.items():
        os.environ.setdefault(key, value)


def unreachable(uri: str) -> str | None:
    """Why the tracking store cannot be used, or None; logs the one warning."""
    problem = _reachable(uri)
    if problem:
        log.warning("MLflow tracking at %s failed while reaching the tracking server (%s); the work goes on "
                    "without tracking", uri, problem)
    return problem


def _reachable(uri: str) -> str | None:
    """None when the tracking store answers, else why not (servers: GET /health within a few seconds)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=HEALTH_TIMEOUT) as response:
            return None if response.status == 200 else f"/health answered HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"/health answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and None become strings (MLflow params are text)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def numeric(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested, flattened) mapping, as MLflow metrics."""
    out = {}
    for key, value in flatten(values, prefix).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key.replace(" ", "_")] = float(value)
    return out


class Tracker:
    """One MLflow run, written through `MlflowClient`. Disabled (every call a no-op) when tracking is off or
    after the first failure, which logs one warning."""

    def __init__(self, uri: str | None, run_id: str | None = None, experiment_id: str | None = None):
        self.uri, self.run_id, self.experiment_id = uri, run_id, experiment_id
        self._client = None
        self.enabled = uri is not None

    # --- opening -----------------------------------------------------------------------------------------

    @classmethod
    def start(cls, uri: str | None, experiment: str, run_name: str, *, tags: dict[str, str] | None = None,
              run_id: str | None = None, parent_run_id: str | None = None) -> "Tracker":
        """A new run (or the existing `run_id`, set running again) in `experiment` (a child of `parent_run_id`,
        in its experiment); disabled when `uri` is None or the store cannot be reached."""
        tracker = cls(uri)
        if uri is None:
            return tracker
        problem = _reachable(uri)
        if problem:
            tracker._fail("reaching the tracking server", problem)
            return tracker

        def open_run():
            client = tracker.client()
            if run_id:
                run = client.get_run(run_id)
                client.update_run(run_id, status="RUNNING")
                return run.info.run_id, run.info.experiment_id
            if parent_run_id:  # a child run lives in its parent's experiment
                exp_id = client.get_run(parent_run_id).info.experiment_id
            else:
                exp_id = experiment_id(client, uri, experiment)
            all_tags = {"mlflow.runName": run_name, **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = client.create_run(exp_id, tags={k: str(v) for k, v in all_tags.items() if v is not None},
                                    run_name=run_name)
            return run.info.run_id, exp_id

        opened = tracker._guard(f"opening a run in experiment {experiment!r}", open_run)
        if opened:
            tracker.run_id, tracker.experiment_id = opened
        return tracker

    def client(self):
        if self._client is None:
            fail_fast()
            database = _sqlite_file(self.uri)
            if database:
                database.parent.mkdir(parents=True, exist_ok=True)
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # --- writing -----------------------------------------------------------------------------------------

    def _fail(self, what: str, err: Any) -> None:
        if self.enabled:
            log.warning("MLflow tracking at %s failed while %s (%s); the work goes on without tracking",
                        self.uri, what, first_line(err))
        self.enabled = False

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self._fail(what, err)
            return None

    def _batch(self, what: str, entities: list, kind: str) -> None:
        def send():
            for start in range(0, len(entities), 100):  # MLflow takes at most 100 params per batch
                self.client().log_batch(self.run_id, **{kind: entities[start:start + 100]})
        self._guard(what, send)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled or not self.run_id:
            return
        from mlflow.entities import Param

        self._batch("logging params", [Param(k[:250], str(v)[:MAX_PARAM_CHARS])
                                       for k, v in flatten(params).items()], "params")

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled or not self.run_id:
            return
        from mlflow.entities import RunTag

        self._batch("setting tags", [RunTag(k, str(v)) for k, v in tags.items() if v is not None], "tags")

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        if not self.enabled or not self.run_id:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._batch("logging metrics", [Metric(k, v, now, step) for k, v in numeric(metrics).items()], "metrics")

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        """Files and folders (kept as folders) under `artifact_path`; missing ones are skipped."""
        if not self.enabled or not self.run_id:
            return

        def send():
            for path in paths:
                path = Path(path)
                if path.is_dir():
                    sub = f"{artifact_path}/{path.name}" if artifact_path else path.name
                    self.client().log_artifacts(self.run_id, str(path), sub)
                elif path.is_file():
                    self.client().log_artifact(self.run_id, str(path), artifact_path)
        self._guard("logging artifacts", send)

    def end(self, status: str = "FINISHED") -> None:
        """End the MLflow run; this tracker writes nothing after it."""
        if self.enabled and self.run_id:
            self._guard("ending the run", lambda: self.client().set_terminated(self.run_id, status))
        self.enabled = False


def common_tags(stage: str, manifest: Path | None) -> dict[str, str]:
    """Tags every cxrscale run carries: the stage, the git commit and the dataset manifest's sha256."""
    commit = git_commit()
    tags = {"cxrscale.stage": stage, "cxrscale.version": __version__, "git_commit": commit,
            "mlflow.source.git.commit": commit}
    if manifest is not None and Path(manifest).is_file():
        tags["dataset_manifest_sha256"] = sha256_file(manifest)
    return tags


# --- a training run's MLflow run, kept in RUN/tracking.json ------------------------------------------------

_OPEN: dict[str, Tracker] = {}


def run_tracker(uri: str | None, experiment: str, run_dir: Path, *, manifest: Path | None = None,
                params: Callable[[], dict[str, Any]] | None = None) -> Tracker:
    """The MLflow run of training run `run_dir`: the one RUN/tracking.json names when it is on the same store
    (a resumed, elastic or evaluated run), else a new one, recorded there. Params are logged once, when the
    MLflow run is created (MLflow refuses to change a logged param). One tracker per run folder and process."""
    key = str(Path(run_dir).resolve())
    if uri is None:
        return Tracker(None)
    if key in _OPEN and _OPEN[key].uri == uri:
        return _OPEN[key]
    record_path = Path(run_dir) / RECORD
    record = read_json(record_path, "tracking record") if record_path.is_file() else {}
    same = record.get("tracking_uri") == uri and record.get("run_id")
    tracker = Tracker.start(uri, experiment, Path(run_dir).name, tags=common_tags("train", manifest),
                            run_id=record["run_id"] if same else None)
    if tracker.enabled and tracker.run_id and not same:
        write_json_atomic(record_path, {"tracking_uri": uri, "run_id": tracker.run_id,
                                        "experiment_id": tracker.experiment_id, "experiment": experiment})
        if params:
            tracker.log_params(params())
    _OPEN[key] = tracker
    return tracker


def end_open(status: str) -> None:
    """End every training run's MLflow run this process opened (a failed or interrupted training)."""
    for tracker in _OPEN.values():
        tracker.end(status)
    _OPEN.clear()


def recorded_run(run_dir: Path | None, uri: str | None) -> str | None:
    """The MLflow run id RUN/tracking.json records for this store, if any."""
    if run_dir is None or uri is None or not (Path(run_dir) / RECORD).is_file():
        return None
    record = read_json(Path(run_dir) / RECORD, "tracking record")
    return record.get("run_id") if record.get("tracking_uri") == uri else None
