"""The run configuration: structured defaults, merge order and validation.

Merge order (later wins): structured defaults (with the recipe's typed
`model` / `data` dataclasses) <- the recipe's `config.yaml` <- an optional
`-c file.yaml` <- command-line `key=value` overrides. When a later layer names
a different `comm.hook` or `optimizer.name`, the earlier layers' parameters of
that section are dropped (they belonged to the other hook/optimizer); the
learning-rate schedule keys are kept. Every key, type, bound and choice is
checked here, so a bad value is one `ConfigError` line before anything runs.
A recipe's `comm_defaults.<hook>` settings fill in what the final `comm`
section leaves out for that hook (so each hook compresses the recipe's model).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .cluster import check_resources
from .errors import ConfigError, closest
from .optim import SCHEDULE_KEYS
from .schema import check_section, param, type_name


@dataclass
class RunSection:
    recipe: str = ""
    name: str = ""  # default: <recipe>-<timestamp>
    seed: int = param(0, ge=0)
    steps: int = param(200, ge=1)
    eval_every: int = param(50, ge=1)
    log_every: int = param(1, ge=1)
    output_dir: str = "runs"
    storage: str = ""  # Ray Train's checkpoints: a path all nodes see (default <run dir>/ray)


PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies


@dataclass
class TrainerSection:
    num_workers: int = param(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = param(1, ge=1)
    max_failures: int = param(0, ge=-1)  # -1: restart without limit
    checkpoint_every: int = param(50, ge=0)
    keep_checkpoints: int = param(2, ge=1)  # newest intact ones kept, across resumes
    bucket_cap_mb: float = param(25.0, gt=0)
    find_unused_parameters: bool = False
    # gradients are views of DDP's buckets: no copy into them and back, one less copy in memory
    gradient_as_bucket_view: bool = True
    engine: str = param("ddp", choices=("ddp", "deepspeed", "horovod"))  # see gradlane.engines
    # per worker beyond cpus_per_worker (and 1 GPU with use_gpu): {"GPU": 0.5, "my_res": 1}
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None  # e.g. "A100": only nodes with that accelerator
    placement_strategy: str = param("PACK", choices=PLACEMENT)


@dataclass
class DeepSpeedSection:
    """Settings of `trainer.engine=deepspeed` (see gradlane.deepspeed)."""

    zero_stage: int = param(0, ge=0, le=2)
    gradient_accumulation_steps: int = param(1, ge=1)
    precision: str = param("fp32", choices=("fp32", "bf16", "fp16"))
    gradient_clipping: float = param(0.0, ge=0)  # 0: off


@dataclass
class RaySection:
    address: str | None = None  # None: embedded local Ray; "auto" or "ray://host:port": join
    num_cpus: int | None = param(None, ge=1)  # CPUs of the embedded local Ray (default: all)


@dataclass
class TrackingSection:
    uri: str | None = None  # default: a local store under run.output_dir
    experiment: str = "gradlane"
    retry_every_s: float = param(5.0, gt=0.0)  # while MLflow is down, retry this often
    finish_timeout_s: float = param(30.0, ge=0.0)  # at the end, wait this long for MLflow


@dataclass
class DebugSection:
    fail_at_step: int = -1  # fail inside the loop at this step, once (fault-tolerance tests)
    fail_rank: int = 0
    fail_with: str = param("exception", choices=("exception", "sigkill"))  # how that rank fails
    step_delay_s: float = param(0.0, ge=0.0)  # sleep per step (to interrupt a run mid-way)


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    ray: RaySection = field(default_factory=RaySection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    comm: dict[str, Any] = field(default_factory=lambda: {"hook": "none"})
    # hook name -> settings that hook takes for this recipe's model unless `comm` gives them
    comm_defaults: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"name": "adamw", "schedule": "constant", "warmup_steps": 0}
    )
    tracking: TrackingSection = field(default_factory=TrackingSection)
    model: dict[str, Any] = field(default_factory=dict)  # the recipe's dataclass replaces
    data: dict[str, Any] = field(default_factory=dict)  # these two (see `config_class`)
    debug: DebugSection = field(default_factory=DebugSection)
    resume: str | None = None  # a run or checkpoint directory to continue (command line only)
    init_from: str | None = None  # a run or checkpoint directory whose weights start a new run


# Sections whose keys are the chosen factory's keyword parameters (checked against its signature).
FACTORY_SECTIONS = {"comm": "hook", "optimizer": "name"}


@functools.cache
def config_class(model: type, data: type) -> type:
    """`Config` with a recipe's typed `model` and `data` sections."""
    return make_dataclass(
        f"Config_{model.__qualname__}_{data.__qualname__}",
        [
            ("model", model, field(default_factory=model)),
            ("data", data, field(default_factory=data)),
        ],
        bases=(Config,),
    )


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


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out or ({prefix.rstrip("."): node} if prefix else {})
    return {prefix.rstrip("."): node}


def _check_keys(layer: dict[str, Any], schema: dict[str, Any], source: str) -> None:
    """Reject keys that belong to no section (names the key and the closest allowed).
    Sections that are mappings (comm, optimizer, trainer.resources_per_worker) take any
    key here; comm and optimizer keys are checked against their factory's signature."""
    mappings = [k for k, default in schema.items() if isinstance(default, dict)]
    for key, value in _leaves(layer).items():
        top = key.split(".")[0]
        if key == "resume" and source != "resumed run config":
            raise ConfigError(f"resume in {source}: give it on the command line, as resume=PATH")
        if key in schema or key == "resume" or any(key.startswith(d + ".") for d in mappings):
            continue
        inside = sorted(k for k in schema if k.startswith(key + "."))
        if inside:  # e.g. model.mlp=0.5 where model.mlp is a section of its own
            keys = ", ".join(inside)
            raise ConfigError(f"{key}={value!r} in {source}: a section; set its keys: {keys}")
        allowed = sorted(set(schema) | {"resume"})
        if top in {f.name for f in fields(Config)}:
            allowed = sorted(k for k in schema if k.startswith(top + "."))
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
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"{what} {str(path)!r}: not valid YAML: {_yaml_problem(exc)}") from exc
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {_first_line(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    """'line 3: did not find expected ',' or ']' (while parsing a flow sequence from line 2)'."""
    text = exc.problem or exc.context or "malformed"
    if exc.problem_mark is not None:
        text = f"line {exc.problem_mark.line + 1}: {text}"
    if exc.problem and exc.context and exc.context_mark is not None:
        text += f" ({exc.context} from line {exc.context_mark.line + 1})"
    return text


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
    recipe: str,
    file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> DictConfig:
    """Merge defaults <- recipe yaml <- base (a resumed run's saved config) <- file <- overrides.

    The recipe's `model` / `data` dataclasses type those sections; the result is
    validated (types, bounds, choices, the hook and optimizer) before it is returned.
    """
    from gradlane.recipes import RECIPES

    entry = RECIPES.get(recipe)
    cls = config_class(entry.model, entry.data)
    layers: list[tuple[str, dict[str, Any]]] = [
        ("recipe", _load_yaml(entry.config, "recipe config"))
    ]
    if base is not None:
        layers.append(("resumed run config", base))
    if file is not None:
        layers.append((f"config file {str(file)!r}", _load_yaml(file, "config file")))
    layers.append(("command-line overrides", _parse_overrides(list(overrides))))

    schema = _schema_keys(cls)
    merged: dict[str, Any] = OmegaConf.to_container(OmegaConf.structured(cls))
    for source, layer in layers:
        _check_keys(layer, schema, source)
        _reset_switched_sections(merged, layer)
        _deep_update(merged, layer)
    merged["run"]["recipe"] = recipe
    defaults = merged["comm_defaults"] or {}
    hook_defaults = defaults.get(merged["comm"].get("hook")) if isinstance(defaults, dict) else 0
    if not isinstance(hook_defaults, dict | None):
        raise ConfigError("comm_defaults must map hook names to their settings")
    hook_defaults = hook_defaults or {}
    merged["comm"] = {**hook_defaults, **merged["comm"]}
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(cls), merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_type_error(cls, exc)) from exc
    check_section("", cls, cfg)
    validate(cfg)
    return cfg


def _type_error(cls: type, exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", "") or "?"
    value = getattr(exc, "value", None)
    return f"{key}={value!r} has the wrong type: expected {type_name(cls, key)}"


def validate(cfg: DictConfig) -> None:
    """Checks the field bounds cannot express: the hook and optimizer exist and accept
    their settings.

    Hook and optimizer are built once on a 2x2 probe layer (without a process
    group), so their own range checks fire here, before anything is written.
    """
    import torch

    from .comm import build_comm_state
    from .engines import check_engine
    from .optim import build_optimizer, build_scheduler

    for section, name_key in FACTORY_SECTIONS.items():
        name = cfg[section].get(name_key)
        if not isinstance(name, str):
            raise ConfigError(f"{section}.{name_key}={name!r} must be a name")
    check_resources(cfg)
    probe = torch.nn.Linear(2, 2)
    build_comm_state(probe, OmegaConf.to_container(cfg.comm, resolve=True))
    build_scheduler(cfg.optimizer, build_optimizer(cfg.optimizer, probe.parameters()), 1)
    check_engine(cfg)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> value, for MLflow params."""
    return _leaves(OmegaConf.to_container(cfg, resolve=True))
