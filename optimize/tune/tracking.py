"""Ray Tune's MLflow integration (`MLflowLoggerCallback`: one MLflow run per trial, its searched config as
params and every reported epoch as metrics, under one experiment), made harmless: the first tracking failure
logs one warning and turns the callback off, and the search goes on."""
from __future__ import annotations

import logging
from typing import Any, Callable

from ray.air.integrations.mlflow import MLflowLoggerCallback

from cxrscale import tracking

log = logging.getLogger("cxrscale.tune")


class TrialTracker(MLflowLoggerCallback):
    def __init__(self, uri: str, experiment: str, tags: dict[str, str]):
        tracking.fail_fast()
        super().__init__(tracking_uri=uri, experiment_name=experiment, tags=tags, save_artifact=False)
        self.uri, self.enabled = uri, True

    def _guarded(self, what: str, fn: Callable[..., Any], *args, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never stop the search
            self.enabled = False
            log.warning("MLflow tracking at %s failed while %s (%s); the search goes on without tracking",
                        self.uri, what, tracking.first_line(err))

    def setup(self, *args, **kwargs) -> None:
        self._guarded("opening the experiment", super().setup, *args, **kwargs)

    def log_trial_start(self, trial) -> None:
        self._guarded(f"starting trial {trial}", super().log_trial_start, trial)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        self._guarded(f"logging trial {trial}", super().log_trial_result, iteration, trial, result)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if trial in getattr(self, "_trial_runs", {}):
            self._guarded(f"ending trial {trial}", super().log_trial_end, trial, failed)


def callbacks(uri: str | None, experiment: str, settings: dict[str, Any], manifest) -> list:
    """[the trial tracker] with --tracking-uri and a reachable store, else []."""
    if uri is None or tracking.unreachable(uri):
        return []
    try:  # created here, so that an embedded store keeps the artifacts beside its database
        tracking.fail_fast()
        from mlflow.tracking import MlflowClient

        tracking.experiment_id(MlflowClient(tracking_uri=uri), uri, experiment)
    except Exception as err:  # noqa: BLE001 - tracking must never stop the search
        log.warning("MLflow tracking at %s failed while opening experiment %r (%s); the search goes on without "
                    "tracking", uri, experiment, tracking.first_line(err))
        return []
    tags = {**tracking.common_tags("tune", manifest), "tune.search": settings["search"],
            "tune.output": settings["output"], "tune.model": settings["model"]}
    return [TrialTracker(uri, experiment, tags)]
