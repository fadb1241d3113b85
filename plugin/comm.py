"""Comm-hook registry and `register_comm_hook(ddp_model, cfg)`.

A comm-hook factory is called as `factory(model, process_group, **params)` (the
group may also be any `Collective`) and returns `(state, hook)` for
`DistributedDataParallel.register_comm_hook`. The
state may offer `state_dict()` / `load_state_dict()` (checkpointed with the
run), `metrics()` (per-step numbers such as bytes sent, logged to MLflow) and
`save_artifacts(outdir)` (plots written at the end of a run).

Engines that call no DDP comm hooks (DeepSpeed, Horovod) get the same hooks'
math as a `GradientExchange` from `build_exchange(model, cfg, collective)` and
call its `average(names, grads)` after backward.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from gradlane.compressors import Collective, GradientExchange

from .errors import ConfigError, closest
from .registry import Registry, bind_params

COMM_HOOKS = Registry("comm hook", "gradlane.comm_hooks")


def _none(model: nn.Module, process_group=None):
    """Plain DDP all-reduce (no hook registered)."""
    return None, None


def _torch_fp16(model: nn.Module, process_group=None):
    """torch's fp16 compression hook (casts buckets to half before all-reduce)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return process_group, default_hooks.fp16_compress_hook


def _torch_powersgd(
    model: nn.Module,
    process_group=None,
    rank: int = 16,
    start_iter: int = 10,
    warm_start: bool = True,
    min_compression_rate: float = 2.0,
):
    """torch's PowerSGD hook (uniform rank, error feedback), the reference anchor."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    if start_iter < 2:
        raise ValueError(f"start_iter={start_iter!r} must be >= 2 for torch's PowerSGD hook")
    state = psgd.PowerSGDState(
        process_group=process_group,
        matrix_approximation_rank=rank,
        start_powerSGD_iter=start_iter,
        min_compression_rate=min_compression_rate,
        warm_start=warm_start,
        use_error_feedback=True,
    )
    return state, psgd.powerSGD_hook


def _fp16(model: nn.Module, process_group=None, start_iter: int = 0):
    """fp16 cast with error feedback (half the bytes)."""
    from gradlane.compressors import Cast, CompressionState, compression_hook

    return CompressionState(model, Cast("fp16"), process_group, start_iter), compression_hook


def _bf16(model: nn.Module, process_group=None, start_iter: int = 0):
    """bf16 cast with error feedback (half the bytes, fp32's range)."""
    from gradlane.compressors import Cast, CompressionState, compression_hook

    return CompressionState(model, Cast("bf16"), process_group, start_iter), compression_hook


def _uniform(model, process_group, compressor, start_iter: int, seed: int, predict_every: int):
    """A CompressionState at the compressor's one level; with `predict_every` > 0 a
    one-candidate controller predicts its error that often (comm/predicted_error)."""
    from gradlane.compressors import CompressionState, Controller, compression_hook

    if isinstance(predict_every, bool) or not isinstance(predict_every, int) or predict_every < 0:
        raise ValueError(f"predict_every={predict_every!r} must be an integer >= 0")
    controller = None
    if predict_every:
        accumulate = min(3, predict_every)
        controller = Controller(compressor, start_iter, predict_every, accumulate, candidates=[])
    state = CompressionState(model, compressor, process_group, start_iter, seed, controller)
    return state, compression_hook


def _powersgd(
    model: nn.Module,
    process_group=None,
    rank: int = 16,
    start_iter: int = 10,
    min_compression_rate: float = 2.0,
    seed: int = 0,
    predict_every: int = 0,
):
    """PowerSGD at one rank for every layer, with error feedback and warm start."""
    from gradlane.compressors import PowerSGD

    compressor = PowerSGD(rank, min_compression_rate, seed)
    return _uniform(model, process_group, compressor, start_iter, seed, predict_every)


def _topk(
    model: nn.Module,
    process_group=None,
    density: float = 0.01,
    start_iter: int = 10,
    predict_every: int = 0,
):
    """TopK sparsification at one density, with error feedback (all-gather + scatter-add)."""
    from gradlane.compressors import TopK

    return _uniform(model, process_group, TopK(density), start_iter, 0, predict_every)


def _qsgd(
    model: nn.Module,
    process_group=None,
    bits: int = 4,
    bucket_size: int = 128,
    start_iter: int = 10,
    seed: int = 0,
    predict_every: int = 0,
):
    """QSGD at one bit width, bit-packed, with error feedback (all-gather)."""
    from gradlane.compressors import QSGD

    compressor = QSGD(bits, bucket_size)
    return _uniform(model, process_group, compressor, start_iter, seed, predict_every)


LGRECO_COMPRESSORS = ("powersgd", "qsgd", "topk")


def _lgreco(
    model: nn.Module,
    process_group=None,
    compressor: str = "powersgd",
    rank: int = 16,
    density: float = 0.01,
    bits: int = 4,
    bucket_size: int = 128,
    min_compression_rate: float = 2.0,
    alpha: float = 1.0,
    start_iter: int = 10,
    adjust_every: int = 100,
    accumulate: int = 3,
    bins: int = 10000,
    candidates: str = "",
    seed: int = 0,
):
    """L-GreCo: per-layer levels of `compressor` chosen by a knapsack every `adjust_every` steps.

    `rank` / `density` / `bits` is the uniform default whose total error times
    `alpha` is the budget; `candidates` ("2,4,8") overrides the levels to choose from.
    """
    from gradlane.compressors import QSGD, LGrecoState, PowerSGD, TopK, lgreco_hook

    if compressor not in LGRECO_COMPRESSORS:
        raise ConfigError(
            f"comm.compressor={compressor!r} is not one of {', '.join(LGRECO_COMPRESSORS)}"
            + closest(compressor, LGRECO_COMPRESSORS)
        )
    if compressor == "powersgd":
        family = PowerSGD(rank, min_compression_rate, seed)
    elif compressor == "topk":
        family = TopK(density)
    else:
        family = QSGD(bits, bucket_size)
    state = LGrecoState(
        model,
        family,
        process_group,
        start_iter=start_iter,
        adjust_every=adjust_every,
        accumulate=accumulate,
        alpha=alpha,
        bins=bins,
        candidates=_parse_levels(candidates, float if compressor == "topk" else int),
        seed=seed,
    )
    return state, lgreco_hook


def _parse_levels(text: str, kind: type) -> list | None:
    """Parse "2, 4,8" into [2, 4, 8]; "" gives None (the compressor's own candidates)."""
    if not text.strip():
        return None
    try:
        return [kind(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"comm.candidates={text!r} must be a comma-separated list of {kind.__name__} levels"
        ) from None


COMM_HOOKS.add("none", _none, "plain DDP all-reduce, no compression")
COMM_HOOKS.add("torch_fp16", _torch_fp16, "torch's built-in fp16 compression hook (anchor)")
COMM_HOOKS.add("torch_powersgd", _torch_powersgd, "torch's built-in PowerSGD hook (anchor)")
COMM_HOOKS.add("fp16", _fp16, "fp16 cast with error feedback")
COMM_HOOKS.add("bf16", _bf16, "bf16 cast with error feedback")
COMM_HOOKS.add("powersgd", _powersgd, "PowerSGD, one rank for all layers, error feedback")
COMM_HOOKS.add("topk", _topk, "TopK sparsification, one density, error feedback")
COMM_HOOKS.add("qsgd", _qsgd, "QSGD, bit-packed, one bit width, error feedback")
COMM_HOOKS.add("lgreco", _lgreco, "L-GreCo: per-layer levels of powersgd|topk|qsgd by knapsack")


class CommHook:
    """The registered hook of one DDP model: its state, checkpointing and metrics."""

    def __init__(self, name: str, state: Any, model: nn.Module):
        self.name = name
        self.state = state
        self._dense_bytes = dense_bytes(model)
        self._device = next(model.parameters()).device

    def state_dict(self) -> dict[str, Any]:
        if hasattr(self.state, "state_dict"):
            return self.state.state_dict()
        if hasattr(self.state, "__getstate__") and not isinstance(self.state, dist.ProcessGroup):
            return dict(self.state.__getstate__() or {})
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if hasattr(self.state, "load_state_dict"):
            self.state.load_state_dict(state)
        else:  # torch's PowerSGDState: restore the pickled fields, keep the live group
            group = self.state.process_group
            self.state.__setstate__(dict(state))
            self.state.process_group = group
            for table in ("error_dict", "p_memory_dict", "q_memory_dict"):
                tensors = getattr(self.state, table)  # checkpoints load on the CPU
                tensors.update({k: v.to(self._device) for k, v in tensors.items()})

    def metrics(self) -> dict[str, float]:
        """Per-step numbers; plain all-reduce reports its dense payload."""
        if hasattr(self.state, "metrics"):
            return self.state.metrics()
        if self.name == "none":
            return {"comm/bytes_per_step": float(self._dense_bytes)}
        return {}

    def save_artifacts(self, outdir: Path) -> None:
        if hasattr(self.state, "save_artifacts"):
            self.state.save_artifacts(outdir)


def build_comm_state(model: nn.Module, cfg: Any, process_group=None) -> tuple[str, Any, Any]:
    """(name, state, hook) of the hook named `cfg.hook`, built for `model` with the rest
    of `cfg` as its parameters; bad names, keys or values raise ConfigError."""
    params = dict(cfg)
    name = params.pop("hook", "none")
    factory = COMM_HOOKS.get(name)
    params = bind_params("comm", name, factory, params)
    try:
        state, hook = factory(model, process_group, **params)
    except ConfigError:
        raise
    except ValueError as exc:  # a compressor's own check names the key and the value
        raise ConfigError(f"comm.{exc}") from exc
    return name, state, hook


DDP_ONLY_HOOKS = ("torch_fp16", "torch_powersgd")


def build_exchange(model: nn.Module, cfg: Any, collective: Collective) -> GradientExchange | None:
    """The GradientExchange of the hook named `cfg.hook` (settings as for DDP) over
    `collective`, for engines without DDP comm hooks; None for `none` (the engine's own
    all-reduce). torch's hooks exist only for DDP: ConfigError."""
    name = dict(cfg).get("hook", "none")
    if name in DDP_ONLY_HOOKS:
        raise ConfigError(f"comm.hook={name!r} is torch's DDP-only hook; use one of gradlane's")
    _, state, _ = build_comm_state(model, cfg, collective)
    if state is not None and not isinstance(state, GradientExchange):
        raise ConfigError(f"comm.hook={name!r} does not build a gradlane GradientExchange")
    if state is not None:
        warn_if_little_compressed(name, state)
    return state


MIN_COMPRESSED_SHARE = 0.5  # below this share of the gradient compressed, registration warns


def warn_if_little_compressed(name: str, state: GradientExchange) -> str | None:
    """Warn (and return the text) when the hook leaves most of the gradient uncompressed,
    naming the largest layers it sends as they are and why."""
    share = state.compressed_share()
    if share >= MIN_COMPRESSED_SHARE:
        return None
    left = state.uncompressed()
    big = sorted(left, key=lambda n: -state.shapes[n].numel())
    shown = "; ".join(f"{n}: {left[n]}" for n in big[:4]) + ("; ..." if len(big) > 4 else "")
    text = (
        f"comm.hook={name!r} compresses {share:.0%} of the gradient: {len(left)} of "
        f"{len(state.shapes)} layers go as they are ({shown})"
    )
    warnings.warn(text, stacklevel=2)
    return text


def register_comm_hook(ddp_model: nn.Module, cfg: Any, process_group=None) -> CommHook:
    """Build the hook named `cfg.hook` with the rest of `cfg` as its parameters and
    register it on `ddp_model` (a DistributedDataParallel). Returns its CommHook."""
    module = ddp_model.module if hasattr(ddp_model, "module") else ddp_model
    name, state, hook = build_comm_state(module, cfg, process_group)
    if hook is not None:
        ddp_model.register_comm_hook(state, hook)
    if isinstance(state, GradientExchange):
        warn_if_little_compressed(name, state)
    return CommHook(name, state, module)


def dense_bytes(model: nn.Module) -> int:
    """Bytes a plain all-reduce of every trainable gradient puts on the wire."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
