"""layers: plain-PyTorch building blocks (no dependency on the rest of gradlane).

One import line per module; each public name is re-exported here.
"""

from .evonorm import IMPLS, NORMS, WITHOUT_ACT, EvoNormB0, EvoNormS0, convert_norms, evonorm  # noqa: F401
from .frames import FrameAveraging, Frames  # noqa: F401
from .gaunt import GauntSelfProduct, GauntTensorProduct  # noqa: F401
from .hyper import ENCODINGS, HyperNet, Hypernetized, hypernetize, mip_encode  # noqa: F401
from .radiance import (  # noqa: F401
    FIELDS,
    LOG_DENSITY_RANGE,
    FieldOutput,
    HashField,
    MLPField,
    PlenoxelField,
    RadianceField,
    TensoRFField,
    build_field,
    clamp_log_density,
    sh_basis,
)
from .render import (  # noqa: F401
    OccupancyGrid,
    Samples,
    blend_weights,
    camera_rays,
    composite,
    psnr,
    ray_box,
    scatter_valid,
    ssim,
    stratified_samples,
)
