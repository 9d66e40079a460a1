"""Verifiers score an evaluation answer against the reference: (response text, reference) -> bool.

Named in the spec as `exact`, `final_number`, `boxed`, or `package.module:function` for a
user's own. A truncated response (no end-of-sequence) never counts as correct; the caller
enforces that, so a verifier only compares text.
"""

from __future__ import annotations

import importlib
import re
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


BUILTIN: dict[str, Verifier] = {"exact": exact, "final_number": final_number, "boxed": boxed}


def resolve_verifier(name: str) -> Verifier:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise UserError(f"data.verifier: unknown verifier {name!r}; allowed: {', '.join(BUILTIN)} or 'module:function'")
    module_name, function_name = name.split(":", 1)
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"data.verifier: cannot load {name!r}: {exc}") from None
    if not callable(function):
        raise UserError(f"data.verifier: {name!r} is not callable")
    return function
