"""The d-sized side of M-FAC: the two passes over the window of stored gradients.

`rows` is an (m, n) tensor, one stored gradient (or this rank's n columns of it) per
row. Both products read the window exactly once: `dots` is G x, `combine` is G^T w.
They run in the window's dtype when it is fp32 or fp64. A bf16 / fp16 window is read
in tiles converted to fp32 on the fly, so the products accumulate and return
in fp32: PyTorch's bf16 matrix-vector kernels round their outputs to bf16, and dot
products rounded to 3 significant digits would make the Gram matrix indefinite.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(window_dtype: torch.dtype) -> torch.dtype:
    """The dtype the products with a window of `window_dtype` are computed in."""
    return torch.float32 if window_dtype in LOW_PRECISION else window_dtype


def _tiles(rows: torch.Tensor):
    """(r0, r1, c0, c1, fp32 copy of rows[r0:r1, c0:c1]) over the window, in one reused buffer.

    On CPU the tiles are cache-sized and only 32 rows tall: reusing the buffer avoids a
    page fault per tile, and few rows keep the number of memory streams (one per row,
    d elements apart) small. Accelerators take tiles of whole columns, 16M elements.
    """
    m, n = rows.shape
    on_cpu = rows.device.type == "cpu"
    height = max(1, min(m, 32) if on_cpu else m)
    width = min(n, max(1024, (1 << 18 if on_cpu else 1 << 24) // height))
    buf = torch.empty(height * width, dtype=torch.float32, device=rows.device)
    for c0 in range(0, n, width):
        c1 = min(c0 + width, n)
        for r0 in range(0, m, height):
            r1 = min(r0 + height, m)
            tile = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            tile.copy_(rows[r0:r1, c0:c1])
            yield r0, r1, c0, c1, tile


def dots(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """G x as fp64, for x of the compute dtype."""
    if rows.dtype not in LOW_PRECISION:
        return torch.mv(rows, x).double()
    out = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
    for r0, r1, c0, c1, tile in _tiles(rows):
        out[r0:r1].addmv_(tile, x[c0:c1])
    return out.double()


def combine(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """G^T w in the compute dtype, for fp64 coefficients w."""
    if rows.dtype not in LOW_PRECISION:
        return torch.mv(rows.T, w.to(rows.dtype))
    out = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
    w = w.float()
    for r0, r1, c0, c1, tile in _tiles(rows):
        out[c0:c1].addmv_(tile.T, w[r0:r1])
    return out
