"""What every actor shares: the environment it starts with, where it runs, and how its calls are collected."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray

from opd_ray.errors import Stuck
from opd_ray.spec.plugins import PLUGINS_VARIABLE


def actor_env(roles_overlap: bool = False) -> dict:
    """Threads for torch inside actors (Ray would pin them to 1, halving CPU throughput here); quiet libraries.

    `roles_overlap`: several actors compute at once (asynchronous mode, several replicas).
    OpenMP threads then wait passively: spinning between parallel regions took the cores
    from the other stages, and an asynchronous step on 2 cores ran 2.5x slower than a
    synchronous one (0.44 s vs 0.18 s; passive: 0.14 s).
    """
    threads = str(os.cpu_count() or 1)
    quiet = {
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
    }
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **quiet}
    if os.environ.get(PLUGINS_VARIABLE):  # the spec's plugins (spec/plugins.py): each actor imports them first
        env[PLUGINS_VARIABLE] = os.environ[PLUGINS_VARIABLE]
    if roles_overlap:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return {"env_vars": env}


START_LOG = "OPD_RAY_START_LOG"  # a file each start of a role's actor is counted in (the test suite's, in CI)


def count_start(kind: str) -> None:
    """One line `kind` appended to $OPD_RAY_START_LOG, when set: how many of each actor a test run started
    (starts are most of the suite's time on 2 cores; docs/development.md). Appends of one short line are whole
    even from several processes at once."""
    path = os.environ.get(START_LOG)
    if path:
        with open(path, "a") as log:
            log.write(kind + "\n")


def actor_location() -> dict:
    """Where the calling actor runs (its process too: a restarted actor has a new one): a run records this
    for every actor (placement.json)."""
    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "gpu_ids": ray.get_gpu_ids(),
        "pid": os.getpid(),
        "niceness": os.getpriority(os.PRIO_PROCESS, 0),  # Ray adds 15 to the node's unless told (recipe/cluster.py)
    }


class EngineActor:
    """What the driver asks of every actor that holds an engine (a rollout worker, a teacher replica): whether it
    is up (after a start or a restart, the driver waits on `ready`), where it runs, and which weights it holds.
    Subclasses take new weights in `load_weights(payload, weight_version)` and record the version there."""

    _weight_version = 0

    def ready(self) -> bool:
        return True

    def location(self) -> dict:
        return actor_location()

    def weight_version(self) -> int:
        """The student weight version this engine holds (0: the initial weights; teachers not synced stay 0)."""
        return self._weight_version

    def load_weights(self, payload: dict, weight_version: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not take new weights")


def get_or_raise_first(refs: list[ray.ObjectRef], timeout_s: float | None = None, what: str = "calls") -> list[Any]:
    """Values of all ranks' calls, raising as soon as one fails: when a rank dies, the others wait
    in a collective until a long timeout, so waiting for all of them would hang the driver.
    After `timeout_s` the calls still running are named (`what`: whose calls, and the setting)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        if not ready:
            stuck = [i for i, ref in enumerate(refs) if ref in pending]
            raise Stuck(f"{what}: {stuck} of {len(refs)} did not finish within {timeout_s:g} s")
        ray.get(ready)  # raises this rank's error now
    return ray.get(refs)


STALE_BUILD_LOCK_S = 600  # building DeepSpeed's CPU comm op takes about a minute on 2 cores


def clear_stale_build_locks(root: Path | None = None, max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """torch builds an extension (DeepSpeed's CPU comm op, at a learner's first start) under a `lock` file that
    every other process waits on, without a limit, until its builder deletes it. A builder killed mid-build
    leaves it behind, and every later learner then waits until trainer.timeouts.start_s. A lock older than any
    build is removed, saying so; a newer one is named, so a wait on it is explained. Returns what was removed."""
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue  # its build just finished
        if age > max_age_s:
            print(f"opd-ray: removing {lock}, {age:.0f} s old: its builder died mid-build (a build takes ~1 min)")
            lock.unlink(missing_ok=True)
            removed.append(lock)
        else:
            print(f"opd-ray: {lock} is held by a torch extension build in progress; waiting for it")
    return removed
