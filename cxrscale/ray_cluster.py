"""Starting a private Ray on this machine, or joining a cluster, for the stages that run Ray tasks."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Sequence

from cxrscale.errors import CxrError

@contextlib.contextmanager
def start_ray(address: str | None, num_cpus: int | None, *, py_modules: Sequence[str] = (),
              log_to_driver: bool = True) -> Iterator[None]:
    """Join the Ray cluster at `address`, or start a private one on this machine with `num_cpus` CPUs (all
    by default) whose every server listens on 127.0.0.1; shut it down on exit if this call started it.
    `py_modules` are shipped to a cluster's workers (they may not have this checkout)."""
    single = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    previous = os.environ.get(single)
    if not address:
        os.environ[single] = "0"  # single-machine mode, for Ray and the servers it starts; read when Ray is imported
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver,
                         runtime_env={"py_modules": list(py_modules)} if py_modules else None)
            else:  # "local": a new Ray even when `ray start` left a cluster on this machine; with no address
                # ray.init() joins that one (/tmp/ray/ray_current_cluster) and refuses num_cpus there
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                         log_to_driver=log_to_driver, logging_level=logging.ERROR,
                         object_store_memory=256 * 1024 * 1024)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise CxrError(f"could not start or reach Ray{f' at --address {address}' if address else ''}: "
                           f"{err}") from None
        if address:
            logging.getLogger("cxrscale").info(
                "joined the Ray cluster at %s (--address %s): %d nodes, %g CPUs", ray.get_runtime_context().gcs_address,
                address, len([n for n in ray.nodes() if n.get("Alive")]), ray.cluster_resources().get("CPU", 0))
    try:
        yield
    finally:
        if started:
            ray.shutdown()
        if not address and previous is None:  # not left behind: a `ray start --address` run from this
            os.environ.pop(single, None)       # process afterwards would refuse to join a cluster
        elif not address:
            os.environ[single] = previous

