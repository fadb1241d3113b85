"""DeepSpeed glue: engine arguments from a gradlane config, and compression in place of
DeepSpeed's gradient all-reduce.

    import deepspeed, gradlane.deepspeed as gds
    engine, optimizer, _, scheduler = deepspeed.initialize(**gds.build(cfg, model))
    compression = gds.Compression(engine, cfg["comm"])    # e.g. {"hook": "lgreco"}
    for batch in batches:
        engine.backward(loss_of(engine, batch))
        if engine.is_gradient_accumulation_boundary():
            compression.average()                         # instead of DeepSpeed's all-reduce
        engine.step()

`build` turns the `optimizer` section into a client optimizer from the registry
(M-FAC follows ZeRO 1/2's partition by itself) with its learning-rate schedule,
and the `deepspeed` section into DeepSpeed's config: ZeRO stage, gradient
accumulation, clipping and precision (bf16: `torch.autocast` around the forward,
fp32 weights and gradients; fp16: DeepSpeed's fp16 mode with dynamic loss
scaling, CUDA only).

Compression runs where it is sound: at ZeRO 0 every rank holds whole gradients
after backward, so `Compression` turns off the engine's backward all-reduce and
averages them with the comm hook's `GradientExchange` over `deepspeed.comm`.
ZeRO 1 and 2 reduce-scatter gradients inside DeepSpeed (in buckets during
backward, into flat partitions) where no per-layer compressor can take their
place, and fp16 mode keeps gradients in loss-scaled units that change with the
scale: both are refused with a one-line ConfigError rather than silently
sending uncompressed gradients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from gradlane.compressors import Collective

from .errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def _section(config: Any, name: str) -> dict[str, Any]:
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    return dict(config.get(name) or {})


def ds_config(config: Any) -> dict[str, Any]:
    """DeepSpeed's config dict from a gradlane config's `deepspeed` section (and the
    recipe's `data.batch_size`, which DeepSpeed only uses to report throughput)."""
    ds = _section(config, "deepspeed")
    precision = ds.get("precision", "fp32")
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(_section(config, "data").get("batch_size", 1)),
        "gradient_accumulation_steps": int(ds.get("gradient_accumulation_steps", 1)),
        "zero_optimization": {"stage": int(ds.get("zero_stage", 0))},
        "zero_allow_untested_optimizer": True,  # DeepSpeed's gate for client optimizers
        "gradient_clipping": float(ds.get("gradient_clipping", 0.0)),
        "steps_per_print": 2**31 - 1,  # gradlane logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        out["fp16"] = {"enabled": True, "auto_cast": True}
    return out


def build(config: Any, model: nn.Module | None = None) -> dict[str, Any]:
    """Keyword arguments for `deepspeed.initialize` from a gradlane config (a dict or
    DictConfig with `optimizer`, `deepspeed` and optionally `run.steps`): `config`, and
    with `model` also `model`, the registry `optimizer` and its `lr_scheduler`."""
    from .optim import build_optimizer, build_scheduler

    args: dict[str, Any] = {"config": ds_config(config)}
    if model is None:
        return args
    opt_cfg = _section(config, "optimizer") or {"name": "adamw"}
    optimizer = build_optimizer(opt_cfg, model.parameters())
    steps = int(_section(config, "run").get("steps", 1))
    scheduler = build_scheduler(opt_cfg, optimizer, steps)
    return args | {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler}


def check_config(cfg: DictConfig) -> None:
    """The `deepspeed` section fits the device and the comm hook (one-line ConfigError)."""
    ds, hook = cfg.deepspeed, cfg.comm.get("hook", "none")
    if ds.precision == "fp16" and not cfg.trainer.use_gpu:
        raise ConfigError(
            "deepspeed.precision='fp16' needs trainer.use_gpu=true (DeepSpeed's fp16 mode "
            "is for CUDA); use bf16 on the CPU"
        )
    if hook == "none":
        return
    if ds.zero_stage != 0:
        raise ConfigError(
            f"comm.hook={hook!r} under DeepSpeed needs deepspeed.zero_stage=0, not "
            f"{ds.zero_stage}: ZeRO 1/2 reduce-scatter gradients inside DeepSpeed, where no "
            "compressor can replace the exchange"
        )
    if ds.precision == "fp16":
        raise ConfigError(
            f"comm.hook={hook!r} with deepspeed.precision='fp16' is not supported: the "
            "gradients are in loss-scaled units that change with the scale; use bf16"
        )


class DeepSpeedCollective(Collective):
    """The compressors' collectives through `deepspeed.comm` on `group` (None: all ranks).

    Starts `deepspeed.comm` on the torch.distributed group when nothing did yet."""

    def __init__(self, group=None):
        import torch.distributed as dist
        from deepspeed import comm

        if not comm.is_initialized():
            comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self.group = group
        super().__init__(comm.get_rank(group=group), comm.get_world_size(group=group))

    def _all_reduce(self, t: Tensor, async_op: bool):
        from deepspeed import comm

        return comm.all_reduce(t, group=self.group, async_op=async_op)

    def _all_gather(self, t: Tensor) -> Tensor:
        from deepspeed import comm

        out = t.new_empty((self.world * t.numel(),))
        comm.all_gather_into_tensor(out, t.contiguous().view(-1), group=self.group)
        return out.view(self.world, *t.shape)

    def _broadcast(self, t: Tensor) -> None:
        from deepspeed import comm

        src = 0 if self.group is None else comm.get_global_rank(self.group, 0)
        comm.broadcast(t, src=src, group=self.group)


class Compression:
    """The comm hook named in `comm_cfg` in place of a DeepSpeed engine's gradient all-reduce.

    With hook "none" it changes nothing (DeepSpeed all-reduces as usual). Otherwise
    the engine must run ZeRO 0 without fp16 mode; its backward all-reduce is turned
    off and `average()` (every rank, after the last micro-batch's backward, before
    `engine.step()`) averages the gradients with the hook's compressor."""

    def __init__(self, engine, comm_cfg: Any):
        from .comm import build_exchange

        if OmegaConf.is_config(comm_cfg):
            comm_cfg = OmegaConf.to_container(comm_cfg, resolve=True)
        comm_cfg = dict(comm_cfg)
        hook = comm_cfg.get("hook", "none")
        self.module = engine.module
        self._named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.exchange = None
        self._dense = float(sum(p.numel() * p.element_size() for _, p in self._named))
        if hook == "none":
            return
        stage = engine.zero_optimization_stage()
        if stage != 0 or engine.fp16_enabled():
            raise ConfigError(
                f"comm.hook={hook!r} needs ZeRO stage 0 without fp16 mode "
                f"(the engine runs stage {stage}, fp16 {engine.fp16_enabled()})"
            )
        self.exchange = build_exchange(self.module, comm_cfg, DeepSpeedCollective())
        engine.enable_backward_allreduce = False

    def average(self) -> None:
        """Average every gradient over ranks with the compressor (a missing one counts as 0)."""
        if self.exchange is None:
            return
        for _, p in self._named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.exchange.average([n for n, _ in self._named], [p.grad for _, p in self._named])

    def metrics(self) -> dict[str, float]:
        """The exchange's numbers; without compression, DeepSpeed's dense all-reduce payload."""
        if self.exchange is None:
            return {"comm/bytes_per_step": self._dense}
        return self.exchange.metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.exchange.state_dict() if self.exchange is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.exchange is not None and state:
            self.exchange.load_state_dict(state)

    def save_artifacts(self, outdir: Path) -> None:
        if self.exchange is not None:
            self.exchange.save_artifacts(outdir)
