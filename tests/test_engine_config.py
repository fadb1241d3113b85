"""`trainer.engine` and the `deepspeed` section: every combination that cannot run is one
ConfigError line before anything starts (exit 2 from the CLI, nothing written)."""

from __future__ import annotations

import pytest

from gradlane.config import compose
from gradlane.errors import ConfigError

BAD = {
    "compression under ZeRO 1": (
        ["trainer.engine=deepspeed", "deepspeed.zero_stage=1", "comm.hook=powersgd"],
        "comm.hook='powersgd' under DeepSpeed needs deepspeed.zero_stage=0, not 1: ZeRO 1/2 "
        "reduce-scatter gradients inside DeepSpeed, where no compressor can replace the exchange",
    ),
    "fp16 on the CPU": (
        ["trainer.engine=deepspeed", "deepspeed.precision=fp16"],
        "deepspeed.precision='fp16' needs trainer.use_gpu=true (DeepSpeed's fp16 mode is for "
        "CUDA); use bf16 on the CPU",
    ),
    "compression with fp16 loss scaling": (
        ["trainer.engine=deepspeed", "trainer.use_gpu=true", "deepspeed.precision=fp16",
         "comm.hook=topk"],
        "comm.hook='topk' with deepspeed.precision='fp16' is not supported: the gradients are "
        "in loss-scaled units that change with the scale; use bf16",
    ),
    "deepspeed settings without deepspeed": (
        ["deepspeed.zero_stage=2"],
        "deepspeed.zero_stage=2 needs trainer.engine=deepspeed (trainer.engine='ddp')",
    ),
    "torch's DDP-only hook under horovod": (
        ["trainer.engine=horovod", "comm.hook=torch_powersgd"],
        "comm.hook='torch_powersgd' is torch's DDP-only hook; under trainer.engine='horovod' "
        "use one of gradlane's (fp16, bf16, powersgd, topk, qsgd, lgreco)",
    ),
    "unknown engine": (
        ["trainer.engine=horovd"],
        "trainer.engine='horovd' is not allowed (did you mean 'horovod'?); "
        "allowed: ddp, deepspeed, horovod",
    ),
    "ZeRO 3": (["trainer.engine=deepspeed", "deepspeed.zero_stage=3"],
               "deepspeed.zero_stage=3 must be in [0, 2]"),
    "no accumulation": (
        ["trainer.engine=deepspeed", "deepspeed.gradient_accumulation_steps=0"],
        "deepspeed.gradient_accumulation_steps=0 must be >= 1",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_impossible_engine_settings_are_one_line_errors(case):
    overrides, message = BAD[case]
    with pytest.raises(ConfigError) as info:
        compose("lm", overrides=overrides)
    assert str(info.value) == message


def test_engine_settings_that_run_compose():
    cfg = compose("lm", overrides=["trainer.engine=deepspeed", "deepspeed.zero_stage=2",
                                   "deepspeed.precision=bf16", "optimizer.name=mfac"])  # fmt: skip
    assert (cfg.trainer.engine, cfg.deepspeed.zero_stage) == ("deepspeed", 2)
    cfg = compose("vision", overrides=["trainer.engine=horovod", "comm.hook=lgreco"])
    assert cfg.trainer.engine == "horovod"


def test_cli_exits_2_before_anything_is_written(gradlane_cli, tmp_path):
    done = gradlane_cli(
        "run", "lm", "trainer.engine=deepspeed", "deepspeed.zero_stage=2", "comm.hook=lgreco",
        f"run.output_dir={tmp_path}", timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gradlane: error: comm.hook='lgreco' under DeepSpeed needs deepspeed.zero_stage=0, not 2: "
        "ZeRO 1/2 reduce-scatter gradients inside DeepSpeed, where no compressor can replace "
        "the exchange"
    ]
    assert not any(tmp_path.iterdir())
