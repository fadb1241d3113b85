"""Which Ray gradlane runs on, and what each worker asks of it.

No `ray.address`: a fresh embedded Ray (`address="local"`), whatever else runs
on the machine or is remembered in Ray's temp directory. `ray.address=auto`,
`host:port` or `ray://host:port`: join that cluster. A cluster joined may
autoscale, so missing capacity there is a warning; the embedded one cannot grow,
so there it is a ConfigError.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from importlib.metadata import version
from typing import Any

from omegaconf import DictConfig

from .errors import ConfigError

MIN_RAY = (2, 51)  # Ray Train V2 (checkpoint_dir_name, its checkpoint layout) is the default
AUTH_MODE = "RAY_AUTH_MODE"
CLIENT_TRIES = 3  # Ray Client connections tried before giving up


def check_ray_version(installed: str | None = None) -> None:
    """ConfigError unless Ray Train V2 is there: Ray >= 2.51 and not switched off."""
    installed = installed or version("ray")
    numbers = tuple(int(p) for p in installed.split(".")[:2] if p.isdigit())
    if numbers < MIN_RAY:
        need = ".".join(map(str, MIN_RAY))
        raise ConfigError(
            f"Ray {installed} is installed; gradlane needs Ray Train V2, the default from Ray "
            f"{need}: pip install 'ray[train]>={need}'"
        )
    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1") == "0":
        raise ConfigError("RAY_TRAIN_V2_ENABLED=0 is set; gradlane needs Ray Train V2: unset it")


def resources_per_worker(cfg: DictConfig) -> dict[str, float]:
    """What one worker reserves: CPUs, a GPU (or a fraction) and custom resources."""
    extra = dict(cfg.trainer.resources_per_worker)
    if "CPU" in extra:
        raise ConfigError(
            f"trainer.resources_per_worker.CPU={extra['CPU']!r}: set trainer.cpus_per_worker"
        )
    if "GPU" in extra and not cfg.trainer.use_gpu:
        raise ConfigError(
            f"trainer.resources_per_worker.GPU={extra['GPU']!r} needs trainer.use_gpu=true"
        )
    for name, amount in extra.items():
        if amount <= 0:
            raise ConfigError(f"trainer.resources_per_worker.{name}={amount!r} must be > 0")
    gpu = {"GPU": 1.0} if cfg.trainer.use_gpu else {}
    return {"CPU": float(cfg.trainer.cpus_per_worker), **gpu, **extra}


def check_resources(cfg: DictConfig) -> None:
    """The checks that need no cluster (run by `gradlane show` too)."""
    resources_per_worker(cfg)
    if cfg.trainer.accelerator_type and not cfg.trainer.use_gpu:
        raise ConfigError(
            f"trainer.accelerator_type={cfg.trainer.accelerator_type!r} needs trainer.use_gpu=true"
        )


def start_ray(cfg: DictConfig) -> bool:
    """Start an embedded Ray or join `ray.address`; True when this call connected."""
    import ray

    if ray.is_initialized():
        return False
    check_ray_version()
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if cfg.ray.address:
        if cfg.ray.address.startswith("ray://"):  # Ray Client: the driver is not a node
            common = {"log_to_driver": False}
        join(cfg.ray.address, common)
        return True
    num_cpus = cfg.ray.num_cpus if cfg.ray.num_cpus is not None else os.cpu_count() or 1
    # Ray's default token auth stays on; only its "auth is enabled" notice is hushed.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    ray.init(address="local", num_cpus=num_cpus, **common)
    return True


def join(address: str, options: dict[str, Any], tries: int = CLIENT_TRIES) -> None:
    """`ray.init` on a cluster; Ray Client is tried again when the head failed to start
    this client's server, which a busy head does now and then (ConnectionAbortedError)."""
    import ray

    for attempt in range(1, tries + 1):
        try:
            ray.init(address=address, **options)
            return
        except ConnectionAbortedError as exc:
            ray.shutdown()
            if attempt == tries:
                raise ConfigError(join_error(address, exc)) from exc
            warnings.warn(
                f"{join_error(address, exc)}; trying again ({attempt + 1}/{tries})",
                stacklevel=2,
            )
            time.sleep(2.0 * attempt)
        except Exception as exc:  # noqa: BLE001 - any failure to join is the user's address
            raise ConfigError(join_error(address, exc)) from exc


def join_error(address: str, exc: BaseException) -> str:
    """One line on why joining failed, naming what to set when token auth is the cause.

    Ray Client puts the server's traceback under a first line of its own; the reason is
    that traceback's last line, so both are kept."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    lines = lines or [type(exc).__name__]
    text = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
    text = text[:300]
    message = f"ray.address={address!r}: cannot connect ({text})"
    if "ray[client]" in text:
        return f"ray.address={address!r}: Ray Client needs pip install 'ray[client]'"
    if os.environ.get(AUTH_MODE, "").lower() != "token":
        message += (
            f"; a cluster started by `ray start` uses token authentication: set {AUTH_MODE}=token "
            "in this shell (the token is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
            "~/.ray/auth_token; `ray get-auth-token` on the head prints it)"
        )
    return message


def check_capacity(cfg: DictConfig, embedded: bool) -> None:
    """Enough CPUs, GPUs and custom resources for every worker: an error on the embedded
    Ray, a warning on a joined cluster (an autoscaler may still add nodes)."""
    import ray

    have = ray.cluster_resources()
    per_worker = resources_per_worker(cfg)
    workers = cfg.trainer.num_workers
    for name, amount in per_worker.items():
        need = amount * workers
        if need <= have.get(name, 0) + 1e-9:
            continue
        what = (
            f"trainer.num_workers={workers} x {amount:g} {name} per worker needs {need:g} {name} "
            f"but the Ray cluster has {have.get(name, 0):g}"
        )
        if embedded:
            most = int(have.get(name, 0) // amount)
            raise ConfigError(f"{what}; allowed: num_workers <= {most}")
        warnings.warn(f"{what} now; waiting for the cluster to scale up", stacklevel=2)


def scaling_config(cfg: DictConfig) -> Any:
    """Ray Train's ScalingConfig from `trainer.*`."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=cfg.trainer.num_workers,
        use_gpu=cfg.trainer.use_gpu,
        resources_per_worker=resources_per_worker(cfg),
        accelerator_type=cfg.trainer.accelerator_type,
        placement_strategy=cfg.trainer.placement_strategy,
    )
