"""The d-sized side of M-FAC: the two passes over the window of stored gradients.

`rows` is an (m, n) tensor, one stored gradient (or this rank's n columns of it) per
row. Both products read the window exactly once: `dots` is G x, `combine` is G^T w.
They run in the window's dtype when it is fp32 or fp64. A bf16 / fp16 window must not
round the products to its own precision (dot products rounded to 3 significant digits
make the Gram matrix indefinite), so they accumulate and return in fp32:

* on a GPU, `torch.mm(..., out_dtype=torch.float32)`: the matrix product reads the
  half-precision window once, accumulates in fp32 and writes fp32 (half the bytes of an
  fp32 window). For G^T w the fp64 coefficients are split into three half-precision
  parts (w = 2^e (w_1 + w_2 + w_3), each the rounding of what the previous left), one
  product with three columns that reads G once: about 24 bits of w, as many as fp32;
* on the CPU, where PyTorch has no such kernel, in cache-sized tiles converted to fp32.

`LOW_PRECISION_KERNEL` picks the GPU path ("mm") or the tiles ("tiles") on a GPU.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
LOW_PRECISION_KERNEL = {"cuda": "mm"}  # device type -> "mm" | "tiles"; others use tiles


def compute_dtype(window_dtype: torch.dtype) -> torch.dtype:
    """The dtype the products with a window of `window_dtype` are computed in."""
    return torch.float32 if window_dtype in LOW_PRECISION else window_dtype


def _use_mm(rows: torch.Tensor) -> bool:
    return LOW_PRECISION_KERNEL.get(rows.device.type, "tiles") == "mm"


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
    """G x as fp64, for x of the window's dtype (the stored gradient)."""
    if rows.dtype not in LOW_PRECISION:
        return torch.mv(rows, x).double()
    if _use_mm(rows):
        return torch.mm(rows, x[:, None], out_dtype=torch.float32)[:, 0].double()
    out = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
    xf = x.float()
    for r0, r1, c0, c1, tile in _tiles(rows):
        out[r0:r1].addmv_(tile, xf[c0:c1])
    return out.double()


def split(w: torch.Tensor, dtype: torch.dtype, parts: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^e, W) with w ~= 2^e * W.sum(1), W of `dtype` with `parts` columns, |W| <= 1.

    Column i holds the rounding of what columns 0..i-1 left over. On the device: the
    power-of-two scale keeps fp16's range and is exact.
    """
    top = w.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    scale = torch.exp2(torch.ceil(torch.log2(top)))
    rest = w / scale
    cols = []
    for _ in range(parts):
        cols.append(rest.to(dtype))
        rest = rest - cols[-1].double()
    return scale, torch.stack(cols, dim=1)


def combine(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """G^T w in the compute dtype, for fp64 coefficients w."""
    if rows.dtype not in LOW_PRECISION:
        return torch.mv(rows.T, w.to(rows.dtype))
    if _use_mm(rows):
        scale, parts = split(w, rows.dtype)
        out = torch.mm(parts.T, rows, out_dtype=torch.float32).sum(0)
        return out.mul_(scale.float())
    out = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
    w = w.float()
    for r0, r1, c0, c1, tile in _tiles(rows):
        out[c0:c1].addmv_(tile.T, w[r0:r1])
    return out
