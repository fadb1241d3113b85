"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """Bad user input: the message names the key, the bad value and what is allowed."""


def closest(value: str, allowed: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest allowed name, or '' when nothing is close."""
    match = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def unknown(kind: str, value: str, allowed: Iterable[str]) -> ConfigError:
    """The standard error for a name that is not among `allowed`."""
    allowed = sorted(allowed)
    return ConfigError(
        f"unknown {kind} {value!r}{closest(value, allowed)}; allowed: {', '.join(allowed)}"
    )
