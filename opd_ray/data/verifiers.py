"""Verifiers score an evaluation answer against the reference: (response text, reference) -> bool.

Named in the spec as `exact`, `final_number`, `boxed`, `first_line_mentions`, or `package.module:function` for a
user's own. A truncated response (no end-of-sequence) never counts as correct; the caller
enforces that, so a verifier only compares text.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable

from opd_ray.errors import UserError

Verifier = Callable[[str, str], bool]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def exact(response: str, reference: str) -> bool:
    return response.strip() == reference.strip()


def _normalise_number(text: str) -> str:
    text = text.replace(",", "")
    return text.rstrip("0").rstrip(".") if "." in text else text


def final_number(response: str, reference: str) -> bool:
    """The last number in the response equals the reference's last number (commas ignored)."""
    got, want = _NUMBER.findall(response), _NUMBER.findall(reference)
    return bool(got and want) and _normalise_number(got[-1]) == _normalise_number(want[-1])


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, honouring nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def boxed(response: str, reference: str) -> bool:
    got = last_boxed(response)
    want = last_boxed(reference) if "\\boxed{" in reference else reference
    return got is not None and want is not None and got.strip() == want.strip()


def first_line_mentions(response: str, reference: str) -> bool:
    """The reference (or one of its `|`-separated alternatives: "small|little"), as whole words and ignoring
    case, appears in the response's first non-empty line.

    For short factual answers a chat model phrases freely ("The opposite of hot is cold."): exact
    match would score the phrasing, not the fact. Only the first line counts, so an answer that lists
    candidates on later lines is not rewarded for one of them."""
    lines = [line for line in response.strip().splitlines() if line.strip()]
    wanted = [word.strip() for word in reference.split("|") if word.strip()]
    if not lines:
        return False
    return any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", lines[0], re.IGNORECASE) for word in wanted)


BUILTIN: dict[str, Verifier] = {
    "exact": exact,
    "final_number": final_number,
    "boxed": boxed,
    "first_line_mentions": first_line_mentions,
}


REPORTED_ERRORS = 5  # a verifier that raises on every sample is reported this often, then only counted


class GuardedVerifier:
    """A verifier whose exceptions do not end the run: each is reported with the verifier's name, the
    response and the row, and the sample scores as wrong; `on_error="raise"` (data.verifier_errors) stops
    the run with the same line instead."""

    def __init__(self, name: str, function: Verifier, on_error: str = "count_wrong") -> None:
        self.name, self.function, self.on_error = name, function, on_error
        self.errors = 0

    def __call__(self, response: str, reference: str, row: int | None = None) -> bool:
        try:
            return bool(self.function(response, reference))
        except Exception as exc:  # a user's code: any exception is the verifier's fault, not the run's
            where = f"row {row}" if row is not None else "a row"
            message = (
                f"data.verifier {self.name!r} raised {type(exc).__name__}: {exc} on {where}, "
                f"response {response[:200]!r}, reference {reference!r}"
            )
            if self.on_error == "raise":
                raise UserError(message + " (data.verifier_errors=raise)") from None
            self.errors += 1
            if self.errors <= REPORTED_ERRORS:
                print(f"opd-ray: warning: {message}; scored as wrong", file=sys.stderr)
            return False


def resolve_verifier(name: str, on_error: str = "count_wrong") -> GuardedVerifier:
    """The verifier `data.verifier` names, guarded (see GuardedVerifier)."""
    return GuardedVerifier(name, _load_verifier(name), on_error)


def check_verifier(verifier: GuardedVerifier, reference: str) -> None:
    """Pre-flight: the verifier is called once, on a real row's reference as the response, so that a
    wrong signature or a crash shows in seconds instead of at step 1."""
    try:
        result = verifier.function(reference, reference)
    except Exception as exc:
        raise UserError(
            f"data.verifier {verifier.name!r} cannot be called as f(response, reference) -> bool on the first row "
            f"with an answer: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(result, (bool, int)) and type(result).__name__ != "bool_":
        raise UserError(
            f"data.verifier {verifier.name!r} returned {type(result).__name__} {result!r}; it must return a bool"
        )


def _load_verifier(name: str) -> Verifier:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise UserError(f"data.verifier: unknown verifier {name!r}; allowed: {', '.join(BUILTIN)} or 'module:function'")
    module_name, function_name = name.split(":", 1)
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"data.verifier: cannot load {name!r}: {exc}") from None
    except Exception as exc:  # the module's own code failed as it was imported (a SyntaxError, a raise at top level)
        where = f" ({exc.filename}:{exc.lineno})" if isinstance(exc, SyntaxError) else ""
        reason = (str(exc).splitlines() or [""])[0]
        raise UserError(
            f"data.verifier: importing {module_name!r} failed{where}: {type(exc).__name__}: {reason}"
        ) from None
    if not callable(function):
        raise UserError(f"data.verifier: {name!r} is not callable")
    return function
