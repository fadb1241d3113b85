"""nerf_distill: progressive volume distillation between radiance-field architectures.

A teacher field (mlp, hash, tensorf or plenoxel) trained from multi-view images
is distilled into a student of any other of the four (Fang et al., AAAI 2023),
on the built-in procedural scene or a data set in the NeRF-synthetic layout.
"""


def __getattr__(name: str):
    """`RECIPE` is built on first use, so that the scene, data and distillation modules
    (and benchmarks/nerf_distill.py) import without OmegaConf, Ray or MLflow."""
    if name == "RECIPE":
        from .recipe import RECIPE

        return RECIPE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
