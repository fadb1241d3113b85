"""The nerf_distill recipe's `model.*` and `data.*` settings, typed and range-checked.

`ModelSettings.parse(cfg.model)` / `DataSettings.parse(cfg.data)` turn a config
section into a dataclass or raise one `ConfigError` line naming the key.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any

from gradlane.errors import ConfigError, closest, unknown
from gradlane.layers import FIELDS, build_field


def _check_type(key: str, value: Any, kind: Any) -> Any:
    """`value` checked against `kind` (int, float, str, list[...], dict); ConfigError
    naming `key` when it does not fit."""
    origin = typing.get_origin(kind)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item,) = typing.get_args(kind)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return dict(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported setting type {kind!r}")


def _parse(cls: type, section: Any, prefix: str):
    """A `cls` instance from a config section (mapping), every value type-checked."""
    values = dict(section or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(
                f"unknown key '{prefix}.{key}'{closest(key, names)}; "
                f"allowed: {', '.join(f'{prefix}.{n}' for n in names)}"
            )
    kwargs = {}
    for name in names:
        if name in values:
            kwargs[name] = _check_type(f"{prefix}.{name}", values[name], hints[name])
    out = cls(**kwargs)
    out.validate()
    return out


def _positive(prefix: str, obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ConfigError(f"{prefix}.{name}={getattr(obj, name)!r} must be >= 1")


@dataclass
class ModelSettings:
    teacher: str = "hash"
    student: str = "mlp"
    teacher_checkpoint: str = ""  # "" trains the teacher first (cached under data.cache_dir)
    teacher_steps: int = 1500
    teacher_lr: float = 0.01
    stage_steps: list[int] = field(default_factory=lambda: [50, 150])
    geo_feat_dim: int = 15
    n_samples: int = 48
    grid_resolution: int = 32
    grid_threshold: float = 1.0
    loss_feature: float = 1.0
    loss_density: float = 0.01
    loss_color: float = 1.0
    loss_rgb: float = 1.0
    mlp: dict = field(default_factory=dict)
    hash: dict = field(default_factory=dict)
    tensorf: dict = field(default_factory=dict)
    plenoxel: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, section: Any) -> ModelSettings:
        return _parse(cls, section, "model")

    def validate(self) -> None:
        for role in ("teacher", "student"):
            if getattr(self, role) not in FIELDS:
                raise unknown(f"model.{role}", getattr(self, role), FIELDS)
        _positive("model", self, "teacher_steps", "geo_feat_dim", "n_samples", "grid_resolution")
        if len(self.stage_steps) != 2 or not 0 <= self.stage_steps[0] <= self.stage_steps[1]:
            raise ConfigError(
                f"model.stage_steps={self.stage_steps!r} must be [end of stage 1, end of "
                "stage 2] with 0 <= first <= second"
            )
        for key in ("teacher_lr", "grid_threshold", "loss_feature", "loss_density",
                    "loss_color", "loss_rgb"):  # fmt: skip
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)!r} must be >= 0")
        for arch in FIELDS:
            try:
                build_field(arch, 1.0, self.geo_feat_dim, **self.arch_settings(arch))
            except ValueError as exc:
                raise ConfigError(f"model.{exc}") from None

    def arch_settings(self, arch: str) -> dict:
        """The settings of field architecture `arch` (`model.<arch>.*`)."""
        return dict(getattr(self, arch))


@dataclass
class DataSettings:
    path: str = ""  # a NeRF-synthetic-layout directory; "" renders the built-in scene
    cache_dir: str = "~/.cache/gradlane/nerf"
    image_size: int = 64
    train_views: int = 100
    test_views: int = 20
    downscale: int = 1
    bound: float = 1.0
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    rays_per_batch: int = 1024
    eval_views: int = 0  # test views evaluated (0: all)
    strip_views: int = 3

    @classmethod
    def parse(cls, section: Any) -> DataSettings:
        return _parse(cls, section, "data")

    def validate(self) -> None:
        _positive("data", self, "image_size", "train_views", "test_views", "downscale",
                  "rays_per_batch", "strip_views")  # fmt: skip
        if self.image_size < 8:
            raise ConfigError(f"data.image_size={self.image_size} must be >= 8")
        if self.bound <= 0:
            raise ConfigError(f"data.bound={self.bound!r} must be > 0")
        if self.eval_views < 0:
            raise ConfigError(f"data.eval_views={self.eval_views!r} must be >= 0 (0: all)")
        if len(self.background) != 3 or not all(0 <= c <= 1 for c in self.background):
            raise ConfigError(
                f"data.background={self.background!r} must be three numbers in [0, 1]"
            )
