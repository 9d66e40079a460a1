"""`plugins:` — modules a spec imports so that what they register exists wherever the run goes.

An objective, stage, tracker, condition or teacher backend of one's own registers itself when its module is
imported. Registered only in the driver, it would be missing in the learner and engine actors (their own
processes, on other nodes too). A spec's `plugins` are imported before the spec is validated (their names are
then valid), and named in OPD_RAY_PLUGINS, which every actor this process starts inherits (actors/runtime.py:
actor_env) and imports first.
"""

from __future__ import annotations

import importlib
import os

from opd_ray.errors import SpecError

PLUGINS_VARIABLE = "OPD_RAY_PLUGINS"


def import_plugins(modules: list[str]) -> None:
    """Imports each module (once: Python keeps them) and names them for the actors this process starts."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # its own code failed, or it is not installed: one line naming it
            reason = (str(exc).splitlines() or [""])[0]
            raise SpecError(f"plugins: importing {module!r} failed: {type(exc).__name__}: {reason}") from None
    named = [m for m in os.environ.get(PLUGINS_VARIABLE, "").split(",") if m]
    os.environ[PLUGINS_VARIABLE] = ",".join(dict.fromkeys([*named, *modules]))


def import_inherited_plugins() -> None:
    """In an actor: the plugins of the process that started it (OPD_RAY_PLUGINS)."""
    import_plugins([m for m in os.environ.get(PLUGINS_VARIABLE, "").split(",") if m])
