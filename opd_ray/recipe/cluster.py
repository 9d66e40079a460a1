"""Joining a Ray cluster, or starting a local one: every command's first contact with Ray."""

from __future__ import annotations

import logging
import os
import warnings

import ray

from opd_ray.driver.interrupts import reclaim_signals
from opd_ray.errors import UserError
from opd_ray.spec import RaySpec


def quiet_token_auth_notice() -> None:
    """Ray prints that a local cluster has token authentication on at every start: that is the safe default,
    not news. The warning that it is *off* is kept."""

    class EnabledNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith("Token authentication is enabled")

    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(EnabledNotice())


WORKER_NICENESS = "RAY_worker_niceness"


def workers_at_driver_priority() -> None:
    """Ray raises its workers' niceness by 15 over the node's (RAY_worker_niceness, an increment), below
    everything else on the machine, so with any other process busy opd-ray's actors (the whole computation)
    lose the CPU to it while the driver (which only waits) keeps its share. A local Ray started here adds
    nothing: its workers run at the driver's own niceness, unless RAY_worker_niceness is set. A cluster's
    workers are set where its nodes start (`ray start` reads the same variable: the Dockerfile and
    cluster_configs/ set it to 0)."""
    os.environ.setdefault(WORKER_NICENESS, "0")


def connect(spec: RaySpec) -> None:
    """Joins the cluster named by `address` (or the one `ray job submit` runs us in), else starts a local one."""
    if ray.is_initialized():
        return
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    quiet_token_auth_notice()
    kwargs: dict = {"log_to_driver": True, "logging_level": "WARNING"}
    if spec.address is None and "RAY_ADDRESS" not in os.environ:
        workers_at_driver_priority()
        kwargs.update(
            num_cpus=spec.num_cpus,
            include_dashboard=spec.include_dashboard,
            dashboard_host=spec.dashboard_host,
        )
    try:
        ray.init(address=spec.address, **kwargs)
    except ConnectionError as exc:
        raise UserError(f"ray.address: cannot connect to Ray at {spec.address!r}: {exc}") from None
    reclaim_signals()  # a SIGTERM from here on still stops the command cleanly
