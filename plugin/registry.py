"""Name -> factory registries, extended by third parties through entry points.

A registry holds built-in entries (given as "module:attribute" strings so that
nothing heavy is imported until the entry is used) and, on first lookup, the
entries of the installed distributions' entry-point group, e.g.

    [project.entry-points."gradlane.comm_hooks"]
    myhook = "mypkg.hooks:make_hook"
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from .errors import ConfigError, closest, unknown


@dataclass
class Entry:
    name: str
    target: str | Callable[..., Any]
    description: str = ""
    origin: str = "built-in"

    def load(self) -> Callable[..., Any]:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self.target = obj
        return self.target

    def summary(self) -> str:
        """The given description, else the target's own `description`, else its docstring's
        first line."""
        if self.description:
            return self.description
        target = self.load()
        if isinstance(getattr(target, "description", None), str):
            return target.description
        doc = inspect.getdoc(target) or ""
        return doc.splitlines()[0] if doc else ""


class Registry:
    """Built-in entries plus those of the entry-point group `group`."""

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry] = {}
        self._plugins_loaded = False

    def add(self, name: str, target: str | Callable[..., Any], description: str = "") -> None:
        self._entries[name] = Entry(name, target, description)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._entries:
                dist = ep.dist.name if ep.dist is not None else "?"
                self._entries[ep.name] = Entry(ep.name, ep.value, origin=dist)

    def refresh(self) -> None:
        """Scan the entry points again (after installing a plugin in a running process)."""
        self._entries = {k: e for k, e in self._entries.items() if e.origin == "built-in"}
        self._plugins_loaded = False

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def entry(self, name: str) -> Entry:
        self._load_plugins()
        if name not in self._entries:
            raise unknown(self.kind, name, self._entries)
        return self._entries[name]

    def get(self, name: str) -> Callable[..., Any]:
        entry = self.entry(name)
        try:
            return entry.load()
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"{self.kind} {name!r} from {entry.origin} cannot be loaded: {exc}"
            ) from exc


def bind_params(kind: str, name: str, factory: Callable[..., Any], params: dict[str, Any]):
    """Check `params` against `factory`'s keyword parameters; return them coerced.

    Unknown keys and values of the wrong type raise ConfigError naming the key,
    the value and what is allowed, so a typo never reaches the factory.
    """
    sig = inspect.signature(factory)
    accepted = {
        p.name: p
        for p in sig.parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in SKIP_PARAMS
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    out = {}
    for key, value in params.items():
        if key not in accepted:
            if takes_any:
                out[key] = value
                continue
            raise ConfigError(
                f"unknown key '{kind}.{key}' for {kind} {name!r}{closest(key, accepted)}; "
                f"allowed: {', '.join(sorted(accepted)) or '(none)'}"
            )
        out[key] = _coerce(f"{kind}.{key}", value, accepted[key])
    return out


SKIP_PARAMS = {"self", "params", "process_group", "model"}


def _coerce(key: str, value: Any, param: inspect.Parameter) -> Any:
    default = param.default
    if default is inspect.Parameter.empty or default is None or value is None:
        return value
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {want.__name__}")
