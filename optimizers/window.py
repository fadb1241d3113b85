"""The d-sized side of M-FAC: the two passes over the window of stored gradients.

`rows` is an (m, n) tensor, one stored gradient (or this rank's n columns of it) per
row. Both products read the window exactly once: `dots` is G x, `combine` is G^T w.
They run in the window's dtype when it is fp32 or fp64. A bf16 / fp16 window is read
in column blocks converted to fp32 on the fly, so the products accumulate and return
in fp32: rounded dot products would make the Gram matrix indefinite.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
BLOCK_BYTES = 4 << 20  # fp32 bytes of one converted column block


def compute_dtype(window_dtype: torch.dtype) -> torch.dtype:
    """The dtype the products with a window of `window_dtype` are computed in."""
    return torch.float32 if window_dtype in LOW_PRECISION else window_dtype


def _blocks(rows: torch.Tensor):
    width = max(256, BLOCK_BYTES // (4 * max(1, rows.shape[0])))
    for start in range(0, rows.shape[1], width):
        yield start, min(start + width, rows.shape[1])


def dots(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """G x as fp64, for x of the compute dtype."""
    if rows.dtype not in LOW_PRECISION:
        return torch.mv(rows, x).double()
    out = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
    for a, b in _blocks(rows):
        out.addmv_(rows[:, a:b].float(), x[a:b])
    return out.double()


def combine(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """G^T w in the compute dtype, for fp64 coefficients w."""
    if rows.dtype not in LOW_PRECISION:
        return torch.mv(rows.T, w.to(rows.dtype))
    out = torch.empty(rows.shape[1], dtype=torch.float32, device=rows.device)
    w = w.float()
    for a, b in _blocks(rows):
        torch.mv(rows[:, a:b].float().T, w, out=out[a:b])
    return out
