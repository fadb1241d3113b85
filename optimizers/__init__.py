"""M-FAC: a matrix-free inverse-Fisher preconditioner over a sliding window of gradients."""

from .mfac import MFAC

__all__ = ["MFAC"]
