"""The d-sized side of M-FAC: the two passes over the window of stored gradients.

`rows` is an (m, n) tensor, one stored gradient (or this rank's n columns of it) per
row. Both products read the window exactly once: `dots` is G x, `combine` is G^T w.
They run in the window's dtype when it is fp32 or fp64. A bf16 / fp16 window is read
in column blocks converted to fp32 on the fly, so the products accumulate and return
in fp32: PyTorch's bf16 matrix-vector kernels round their outputs to bf16, and dot
products rounded to 3 significant digits would make the Gram matrix indefinite.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(window_dtype: torch.dtype) -> torch.dtype:
    """The dtype the products with a window of `window_dtype` are computed in."""
    return torch.float32 if window_dtype in LOW_PRECISION else window_dtype


def _blocks(rows: torch.Tensor):
    """(start, end, fp32 copy of rows[:, start:end]) over the columns, in one reused buffer.

    The buffer is cache-sized on CPU (reusing it avoids a page fault per block) and
    large on accelerators (fewer kernel launches).
    """
    block_bytes = 1 << 20 if rows.device.type == "cpu" else 64 << 20
    m, n = rows.shape
    width = min(n, max(512, block_bytes // (4 * max(1, m))))
    buf = torch.empty(m, width, dtype=torch.float32, device=rows.device)
    for start in range(0, n, width):
        end = min(start + width, n)
        block = buf[:, : end - start]
        block.copy_(rows[:, start:end])
        yield start, end, block


def dots(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """G x as fp64, for x of the compute dtype."""
    if rows.dtype not in LOW_PRECISION:
        return torch.mv(rows, x).double()
    out = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
    for a, b, block in _blocks(rows):
        out.addmv_(block, x[a:b])
    return out.double()


def combine(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """G^T w in the compute dtype, for fp64 coefficients w."""
    if rows.dtype not in LOW_PRECISION:
        return torch.mv(rows.T, w.to(rows.dtype))
    out = torch.empty(rows.shape[1], dtype=torch.float32, device=rows.device)
    w = w.float()
    for a, b, block in _blocks(rows):
        torch.mv(block.T, w, out=out[a:b])
    return out
