"""gradlane: layerwise gradient compression, M-FAC and equivariant layers for
distributed PyTorch, with recipes launched on Ray and tracked in MLflow.

The two calls a user's own training script makes:

    hook = gradlane.register_comm_hook(ddp_model, {"hook": "lgreco"})
    optimizer = gradlane.build_optimizer({"name": "mfac", "lr": 1e-3}, model.parameters())
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "register_comm_hook": "gradlane.comm",
    "COMM_HOOKS": "gradlane.comm",
    "CommHook": "gradlane.comm",
    "build_optimizer": "gradlane.optim",
    "build_scheduler": "gradlane.optim",
    "OPTIMIZERS": "gradlane.optim",
    "RECIPES": "gradlane.recipes",
    "ConfigError": "gradlane.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradlane' has no attribute {name!r}")
