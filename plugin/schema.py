"""Typed config sections: dataclass fields with ranges and choices, checked in one place.

    @dataclass
    class Model:
        width: int = param(16, ge=1)
        dropout: float = param(0.0, ge=0.0, lt=1.0)
        norm: str = param("batchnorm", choices=("batchnorm", "evonorm_s0"))
        hidden: list[int] = param([16], ge=1)  # a bound applies to every item of a list

        def check(self) -> None:  # optional: rules that span several fields
            if self.width % 4:
                raise ConfigError(f"model.width={self.width} must be divisible by 4")

OmegaConf enforces the types (the dataclass is a structured config);
`check_section` enforces the bounds and choices, then calls the section's own
`check()`. Every failure is a one-line `ConfigError` naming `section.key=value`.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, closest

BOUNDS = ("ge", "gt", "le", "lt")


def param(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field with a default and the values it allows (None: unbounded)."""
    rules = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    meta = {k: v for k, v in rules.items() if v is not None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _interval(meta: dict[str, Any]) -> str:
    """'>= 1', '< 1', 'in [0, 1)' from the bounds of `meta`."""
    lo = f"[{meta['ge']:g}" if "ge" in meta else f"({meta['gt']:g}" if "gt" in meta else ""
    hi = f"{meta['le']:g}]" if "le" in meta else f"{meta['lt']:g})" if "lt" in meta else ""
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]


def _inside(value: Any, meta: dict[str, Any]) -> bool:
    return not (
        ("ge" in meta and value < meta["ge"])
        or ("gt" in meta and value <= meta["gt"])
        or ("le" in meta and value > meta["le"])
        or ("lt" in meta and value >= meta["lt"])
    )


def _check_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    if value is None:
        return
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    shown = f"{key}={value!r}" + (": every item" if isinstance(value, (list, tuple)) else "")
    if "choices" in meta:
        for item in items:
            if item not in meta["choices"]:
                raise ConfigError(
                    f"{shown} is not allowed{closest(item, meta['choices'])}; "
                    f"allowed: {', '.join(meta['choices'])}"
                )
    if any(b in meta for b in BOUNDS) and not all(_inside(v, meta) for v in items):
        raise ConfigError(f"{shown} must be {_interval(meta)}")


def check_section(prefix: str, cls: type, node: DictConfig) -> None:
    """Bounds and choices of every field of dataclass `cls` in `node`, then `cls.check`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = node[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            check_section(f"{prefix}{f.name}.", hints[f.name], value)
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        _check_value(f"{prefix}{f.name}", value, dict(f.metadata))
    if callable(getattr(cls, "check", None)):
        OmegaConf.to_object(node).check()


def type_name(cls: type, key: str) -> str:
    """The declared type of dotted `key` (a field of dataclass `cls`), for error messages."""
    hint: Any = cls
    for part in key.split("."):
        name = part.split("[")[0]
        hints = typing.get_type_hints(hint) if dataclasses.is_dataclass(hint) else {}
        if name not in hints:
            return "a value of the declared type"
        hint = hints[name]
        if "[" in part:  # an item of a list
            hint = typing.get_args(hint)[0]
    return _show(hint)


def _show(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return f"a list of {_show(args[0])}"
    if origin is not None and len(args) == 1:  # X | None
        return f"{_show(args[0])} or null"
    return getattr(hint, "__name__", str(hint))
