"""The nerf_distill recipe's `model.*` and `data.*` settings, typed and bounded.

Types are enforced by OmegaConf, bounds and choices by `gradlane.schema`, and
`check()` runs the rules that span fields (each field architecture's own
checks, the stage schedule) when the config is composed, before Ray starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gradlane.errors import ConfigError
from gradlane.layers import FIELDS, build_field
from gradlane.recipe import param

ARCHS = tuple(sorted(FIELDS))


@dataclass
class MLPSettings:
    width: int = param(64, ge=1)
    depth: int = param(4, ge=1)
    freqs: int = param(8, ge=0)  # positional-encoding frequencies
    skip: int = param(2, ge=0)  # layer the encoding re-enters (0: none)
    color_hidden: int = param(64, ge=1)


@dataclass
class HashSettings:
    levels: int = param(12, ge=1)
    features: int = param(2, ge=1)  # per level
    table_log2: int = param(15, ge=4, le=26)  # entries per level: 2^table_log2
    base_resolution: int = param(16, ge=1)
    max_resolution: int = param(256, ge=1)
    hidden: int = param(64, ge=1)
    color_hidden: int = param(64, ge=1)


@dataclass
class TensoRFSettings:
    resolution: int = param(64, ge=2)
    density_rank: int = param(8, ge=1)
    color_rank: int = param(16, ge=1)
    init_scale: float = param(0.1, gt=0.0)
    color_hidden: int = param(64, ge=1)


@dataclass
class PlenoxelSettings:
    resolution: int = param(48, ge=2)
    sh_degree: int = param(2, ge=1, le=4)


@dataclass
class NerfModel:
    teacher: str = param("hash", choices=ARCHS)
    student: str = param("mlp", choices=ARCHS)
    teacher_checkpoint: str = ""  # a teacher.pt of an earlier run; "": train the teacher first
    teacher_steps: int = param(1500, ge=1)  # training the teacher from the images (when here)
    teacher_lr: float = param(0.01, gt=0.0)
    stage_steps: list[int] = param([50, 150], ge=0)  # ends of stage 1 and stage 2
    geo_feat_dim: int = param(15, ge=1)  # stage-1 representation: 1 + geo_feat_dim values
    n_samples: int = param(48, ge=1)  # samples per ray, stratified inside the scene box
    grid_resolution: int = param(32, ge=1)  # occupancy grid cells per axis
    grid_threshold: float = param(1.0, ge=0.0)  # density above which a cell is occupied
    loss_feature: float = param(1.0, ge=0.0)  # weights of the distillation terms
    loss_density: float = param(0.01, ge=0.0)
    loss_color: float = param(1.0, ge=0.0)
    loss_rgb: float = param(1.0, ge=0.0)
    mlp: MLPSettings = field(default_factory=MLPSettings)
    hash: HashSettings = field(default_factory=HashSettings)
    tensorf: TensoRFSettings = field(default_factory=TensoRFSettings)
    plenoxel: PlenoxelSettings = field(default_factory=PlenoxelSettings)

    def check(self) -> None:
        if len(self.stage_steps) != 2 or self.stage_steps[0] > self.stage_steps[1]:
            raise ConfigError(
                f"model.stage_steps={list(self.stage_steps)} must be [end of stage 1, end of "
                "stage 2] with the first <= the second"
            )
        for arch in ARCHS:
            try:
                build_field(arch, 1.0, self.geo_feat_dim, **self.arch_settings(arch))
            except ValueError as exc:
                raise ConfigError(f"model.{exc}") from None

    def arch_settings(self, arch: str) -> dict:
        """The settings of field architecture `arch` (`model.<arch>.*`) as keywords."""
        return asdict(getattr(self, arch))


@dataclass
class NerfData:
    path: str = ""  # a directory in the NeRF-synthetic layout; "": the built-in scene
    cache_dir: str = "~/.cache/gradlane/nerf"  # the rendered scene and trained teachers
    image_size: int = param(64, ge=8)  # the built-in scene: pixels per side
    train_views: int = param(100, ge=1)
    test_views: int = param(20, ge=1)
    downscale: int = param(1, ge=1)  # shrink the images by this factor on loading
    bound: float = param(1.0, gt=0.0)  # the scene box [-bound, bound]^3 (1.5: NeRF-synthetic)
    background: list[float] = param([1.0, 1.0, 1.0], ge=0.0, le=1.0)
    rays_per_batch: int = param(1024, ge=1)  # rays per worker per step
    eval_views: int = param(0, ge=0)  # test views evaluated (0: all)
    strip_views: int = param(3, ge=1)  # test views in the ground truth | teacher | student strip

    def check(self) -> None:
        if len(self.background) != 3:
            raise ConfigError(f"data.background={list(self.background)} must be 3 numbers")
