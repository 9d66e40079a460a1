"""User-facing errors: raised for bad input, printed as one line by the CLI, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the spec, the data or the model files; the message names the cause."""


class SpecError(UserError):
    """The experiment spec is malformed: unknown key, wrong type, value out of range."""


class RunStopped(UserError):
    """The run stopped itself to protect its checkpoints (non-finite loss or weights); --resume continues."""


class Stuck(RunStopped):
    """The run cannot go on: an actor did not answer within its trainer.timeouts setting, or cannot be
    restarted any more; the message names it (and the loop adds the last checkpoint)."""


class Interrupted(RunStopped):
    """SIGTERM or SIGINT: the run stopped between steps (after a checkpoint, when checkpoints are on)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
