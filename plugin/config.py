"""The run configuration: structured defaults, merge order and validation.

Merge order (later wins): structured defaults <- the recipe's `config.yaml`
<- an optional `-c file.yaml` <- command-line `key=value` overrides. When a
later layer names a different `comm.hook` or `optimizer.name`, the earlier
layers' parameters of that section are dropped (they belonged to the other
hook/optimizer); the learning-rate schedule keys are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, closest
from .optim import SCHEDULE_KEYS


@dataclass
class RunSection:
    recipe: str = ""
    name: str = ""  # default: <recipe>-<timestamp>
    seed: int = 0
    steps: int = 200
    eval_every: int = 50
    log_every: int = 1
    output_dir: str = "runs"


@dataclass
class TrainerSection:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 0
    checkpoint_every: int = 50
    bucket_cap_mb: float = 25.0
    find_unused_parameters: bool = False


@dataclass
class RaySection:
    address: str | None = None  # None: embedded local Ray; "auto" or "ray://host:port": join
    num_cpus: int | None = None  # CPUs of the embedded local Ray (default: all)


@dataclass
class TrackingSection:
    uri: str | None = None  # default: a local store under run.output_dir
    experiment: str = "gradlane"


@dataclass
class DebugSection:
    fail_at_step: int = -1  # raise inside the loop at this step, once (fault-tolerance tests)
    fail_rank: int = 0


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    ray: RaySection = field(default_factory=RaySection)
    comm: dict[str, Any] = field(default_factory=lambda: {"hook": "none"})
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"name": "adamw", "schedule": "constant", "warmup_steps": 0}
    )
    tracking: TrackingSection = field(default_factory=TrackingSection)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    debug: DebugSection = field(default_factory=DebugSection)
    resume: str | None = None


# Sections whose keys are the recipe's own (declared by its config.yaml) or the
# chosen factory's keyword parameters (checked against its signature).
RECIPE_SECTIONS = ("model", "data")
FACTORY_SECTIONS = {"comm": "hook", "optimizer": "name"}
TRUSTED = ("recipe", "resumed run config")  # layers that may declare model/data keys


def _schema_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default for every leaf of the structured defaults."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            out.update(_schema_keys(type(default), key + "."))
        else:
            out[key] = default
    return out


SCHEMA = _schema_keys(Config)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): node}
    return {prefix.rstrip("."): node}


def _check_keys(layer: dict[str, Any], recipe_keys: set[str], source: str) -> None:
    """Reject keys that belong to no section (names the key and the closest allowed)."""
    for key in _leaves(layer):
        top = key.split(".")[0]
        if key == "resume" and source != "resumed run config":
            raise ConfigError(f"resume in {source}: give it on the command line, as resume=PATH")
        if top in FACTORY_SECTIONS or key in SCHEMA or key == "resume":
            continue
        if top in RECIPE_SECTIONS and (key in recipe_keys or source in TRUSTED):
            continue
        allowed = sorted(set(SCHEMA) | recipe_keys | {"resume"})
        if top in RECIPE_SECTIONS:
            allowed = sorted(k for k in recipe_keys if k.startswith(top + "."))
        elif top in {f.name for f in fields(Config)}:
            allowed = sorted(k for k in SCHEMA if k.startswith(top + "."))
        raise ConfigError(
            f"unknown key {key!r} in {source}{closest(key, allowed)}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from exc


def _load_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except (OmegaConfBaseException, OSError, ValueError) as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data


def _reset_switched_sections(merged: dict[str, Any], layer: dict[str, Any]) -> None:
    """A layer that picks another hook/optimizer drops the previous one's parameters."""
    for section, name_key in FACTORY_SECTIONS.items():
        new = (layer.get(section) or {}).get(name_key)
        old = (merged.get(section) or {}).get(name_key)
        if new is not None and new != old and section in merged:
            merged[section] = {k: v for k, v in merged[section].items() if k in SCHEDULE_KEYS}


def _deep_update(base: dict[str, Any], layer: dict[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def compose(
    recipe_yaml: Path | None,
    file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> DictConfig:
    """Merge defaults <- recipe yaml <- base (a resumed run's saved config) <- file <- overrides."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if recipe_yaml is not None:
        layers.append(("recipe", _load_yaml(recipe_yaml, "recipe config")))
    if base is not None:
        layers.append(("resumed run config", base))
    if file is not None:
        layers.append((f"config file {str(file)!r}", _load_yaml(file, "config file")))
    layers.append(("command-line overrides", _parse_overrides(list(overrides))))

    recipe_keys = {
        key
        for source, layer in layers
        if source in TRUSTED
        for key in _leaves(layer)
        if key.split(".")[0] in RECIPE_SECTIONS
    }
    merged: dict[str, Any] = OmegaConf.to_container(OmegaConf.structured(Config))
    for source, layer in layers:
        _check_keys(layer, recipe_keys, source)
        _reset_switched_sections(merged, layer)
        _deep_update(merged, layer)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_type_error(exc)) from exc
    validate(cfg)
    return cfg


def _type_error(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", "") or "?"
    value = getattr(exc, "value", None)
    want = SCHEMA.get(key)
    expected = type(want).__name__ if want is not None else "a value of the declared type"
    return f"{key}={value!r} has the wrong type: expected {expected}"


POSITIVE = ("run.steps", "run.eval_every", "run.log_every", "trainer.num_workers",
            "trainer.cpus_per_worker")  # fmt: skip
NON_NEGATIVE = ("run.seed", "trainer.checkpoint_every")


def validate(cfg: DictConfig) -> None:
    """Range checks the types alone cannot express."""
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r} must be >= 1")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r} must be >= 0")
    if cfg.trainer.max_failures < -1:
        raise ConfigError(f"trainer.max_failures={cfg.trainer.max_failures!r} must be >= -1")
    if cfg.ray.num_cpus is not None and cfg.ray.num_cpus < 1:
        raise ConfigError(f"ray.num_cpus={cfg.ray.num_cpus!r} must be >= 1 (or null: all CPUs)")
    if cfg.trainer.bucket_cap_mb <= 0:
        raise ConfigError(f"trainer.bucket_cap_mb={cfg.trainer.bucket_cap_mb!r} must be > 0")
    for section, name_key in FACTORY_SECTIONS.items():
        name = cfg[section].get(name_key)
        if not isinstance(name, str):
            raise ConfigError(f"{section}.{name_key}={name!r} must be a name")
    check_factories(cfg)


def check_factories(cfg: DictConfig) -> None:
    """The recipe, hook, optimizer and schedule exist and accept their settings.

    Hook and optimizer are built once on a 2x2 probe layer (without a process
    group), so their own range checks fire here, before anything is written.
    """
    import torch

    from gradlane.recipes import RECIPES

    from .comm import build_comm_state
    from .optim import build_optimizer, build_scheduler

    if not cfg.run.recipe:
        raise ConfigError("run.recipe is empty: name a recipe (see `gradlane list`)")
    RECIPES.entry(cfg.run.recipe)
    probe = torch.nn.Linear(2, 2)
    build_comm_state(probe, OmegaConf.to_container(cfg.comm, resolve=True))
    build_scheduler(cfg.optimizer, build_optimizer(cfg.optimizer, probe.parameters()), 1)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> value, for MLflow params."""
    return _leaves(OmegaConf.to_container(cfg, resolve=True))
