"""trackio: one run per opd-ray run in its local store ($TRACKIO_DIR, else ~/.cache/huggingface/trackio);
`trackio show --project <logging.project>` opens it. trackio's own CPU/GPU sampling is off: the run logs what
opd-ray measures.

trackio reopens a run by its name alone (the newest run of that name), so two opd-ray runs sharing run.name
would resume into each other: each opd-ray run gets a trackio run of its own name, `<run.name>-<6 hex>`,
stored in trackers.json and reopened by it. Nothing goes to a hosted service unless logging.trackio_space_id
names a Space: trackio would otherwise publish to one named by TRACKIO_SPACE_ID (or a server named by
TRACKIO_SERVER_URL) in the environment, so those are refused when the spec names none.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, ClassVar

from opd_ray.errors import UserError
from opd_ray.tracking.base import RunIdentity, summary_entries

# What makes trackio send a run somewhere other than its local store, read from the environment by trackio.init.
HOSTED_ENVIRONMENT = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID")


def refuse_unasked_hosting(identity: RunIdentity) -> None:
    """A Space or server taken from the environment would publish the run (a Space is public unless made
    private); only the spec's own key may ask for that."""
    named = [variable for variable in HOSTED_ENVIRONMENT if os.environ.get(variable)]
    if named and not identity.settings.get("trackio_space_id"):
        raise UserError(
            f"logging.trackers: trackio: {', '.join(named)} is set in the environment and would send this run to a "
            "hosted Trackio; opd-ray logs to trackio's local store unless logging.trackio_space_id names a Space: "
            "unset it, or set logging.trackio_space_id"
        )


class TrackioTracker:
    name: ClassVar[str] = "trackio"
    durable_only: ClassVar[bool] = True

    def __init__(self) -> None:
        self._run = None

    def start(self, identity: RunIdentity, resume_after: int | None) -> str | None:
        import trackio

        refuse_unasked_hosting(identity)
        run_name = identity.resume_id or f"{identity.name}-{secrets.token_hex(3)}"
        space = identity.settings.get("trackio_space_id")
        self._run = trackio.init(
            project=identity.project,
            name=run_name,
            config=identity.config,
            resume="must" if identity.resume_id else "never",
            space_id=space,
            private=True if space else None,  # a Space opd-ray creates is private
            auto_log_cpu=False,
            auto_log_gpu=False,
            embed=False,
        )
        return run_name

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def log_summary(self, summary: dict[str, Any], step: int) -> None:
        numbers, _ = summary_entries(summary)
        self._run.log(numbers, step=step)

    def finish(self, succeeded: bool) -> None:
        """Also forgets the run as trackio's current one: trackio's exit hook would otherwise finish it again and
        print "Run finished. Uploading logs to Trackio" as the last line of the process, even for a local store."""
        from trackio import context_vars

        self._run.finish()
        if context_vars.current_run.get() is self._run:
            context_vars.current_run.set(None)
