"""Joining a Ray cluster, or starting a local one: every command's first contact with Ray."""

from __future__ import annotations

import os
import warnings

import ray

from opd_ray.errors import UserError
from opd_ray.spec import RaySpec


def connect(spec: RaySpec) -> None:
    """Joins the cluster named by `address` (or the one `ray job submit` runs us in), else starts a local one."""
    if ray.is_initialized():
        return
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    kwargs: dict = {"log_to_driver": True, "logging_level": "WARNING"}
    if spec.address is None and "RAY_ADDRESS" not in os.environ:
        kwargs.update(
            num_cpus=spec.num_cpus,
            include_dashboard=spec.include_dashboard,
            dashboard_host=spec.dashboard_host,
        )
    try:
        ray.init(address=spec.address, **kwargs)
    except ConnectionError as exc:
        raise UserError(f"ray.address: cannot connect to Ray at {spec.address!r}: {exc}") from None
