"""The m x m side of M-FAC: the window's Gram matrix and the inverse of k*damp*I + Gram.

With the k window gradients as the rows of G (k x d), the empirical Fisher is

    F = damp * I + (1/k) G^T G.

The push-through identity (damp*I + G^T G / k)^{-1} G^T = k G^T (k*damp*I + G G^T)^{-1}
turns every product with F^{-1} into products with the small matrix

    K = k*damp*I + G G^T          (k x k, entries <g_i, g_j> plus the damping shift).

In particular the newest gradient, row j of G, is preconditioned by

    F^{-1} g_j = G^T w,   w = k * K^{-1} e_j   (column j of the inverse, times k),

so no subtraction of nearly equal vectors of length d ever happens.

This module keeps, in fp64 whatever the window's dtype: `gram` (the m x m dot products,
each computed once when its gradient enters) and `inv` (K^{-1} while the window is full).
A new gradient replaces the oldest slot j, which changes one row and column of K:

* window full: K^{-1} is updated in O(m^2) -- remove slot j (a rank-1 downdate,
  a Schur complement) and insert the new gradient (a rank-1 update whose pivot
  s = K'_jj - b^T K_{-j}^{-1} b is provably >= k*damp; a computed s below k*damp/2 means
  K is not numerically positive definite: the gradient is rejected);
* the column of K^{-1} used for the step then gets one step of iterative refinement
  against K itself (two more O(m^2) products): the explicit-inverse updates lose
  about cond(K) * 1e-16 per step within a lap, the refined column is as accurate as a
  fresh Cholesky solve;
* once per lap of the window (slot m-1), K^{-1} is recomputed from `gram` with a
  Cholesky factorisation, O(m^3) once every m steps = O(m^2) amortised, so the
  rounding of the updates never accumulates across laps;
* warm-up (the first m steps): the shift k*damp grows with k, which is not a low-rank
  change, so the k x k K is factored afresh each step, O(k^3).

Which of these runs depends only on `count` (a Python int: the steps taken so far), never
on a tensor's value, so a step queues its work on the device without waiting for it. A
gradient is rejected on the device instead: `admit` returns a boolean tensor `ok`, and
every write is a `torch.where(ok, new, old)`, so a rejected gradient leaves the Gram
matrix and the inverse as they were. The slot still advances: during warm-up it stays a
zero gradient, later it keeps the gradient it held (one lap longer).
"""

from __future__ import annotations

import torch

F64 = torch.float64


def new_system(m: int, device: torch.device) -> dict:
    """Empty Gram matrix and inverse for a window of m slots."""
    return {
        "gram": torch.zeros(m, m, dtype=F64, device=device),
        "inv": torch.zeros(m, m, dtype=F64, device=device),
        "count": 0,
    }


def admit(
    system: dict, dots: torch.Tensor, sq: torch.Tensor, damp: float, ok: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Take a new gradient g into the slot of the oldest one, without a host sync.

    `dots[i] = <g, g_i>` over the slots filled so far (min(count, m) of them, the
    evicted slot's entry included and ignored), `sq = <g, g>` (a 0-d tensor), `ok` a 0-d
    bool tensor, False when they are not all finite. Returns
    `(slot, w, ok)`: F^{-1} g = G^T w over the rows G of the window after g is written
    into `slot`, and `ok` (a 0-d bool tensor) False when g was rejected -- a dot product
    not finite, or K not numerically positive definite -- in which case w is zero and the
    system is unchanged (the caller keeps the slot's old row likewise).
    """
    gram, inv = system["gram"], system["inv"]
    m = gram.shape[0]
    count = system["count"]
    slot = count % m
    k = min(count + 1, m)
    shift = k * damp
    row = torch.zeros(k, dtype=F64, device=gram.device)
    row[: dots.numel()] = dots
    row[slot] = sq
    old = gram[slot, :k]
    row = torch.where(ok, row, old)  # a harmless stand-in: nothing non-finite enters

    if count >= m and slot != m - 1:
        col, ok = _replace(inv, row, slot, shift, ok)
    else:
        col, ok = _factor(gram, inv, row, slot, shift, ok)
    new_row = torch.where(ok, row, old)
    gram[slot, :k] = new_row
    gram[:k, slot] = new_row
    system["count"] = count + 1
    if count >= m and slot != m - 1:
        col = _refine(gram, inv, col, slot, shift)
    return slot, torch.where(ok, k * col, 0.0), ok


def _replace(inv: torch.Tensor, row: torch.Tensor, j: int, shift: float, ok: torch.Tensor):
    """Swap slot j of a full window's K^{-1} in place, O(m^2): (column j, ok).

    Nothing changes where `ok` is False on entry or the pivot shows lost precision.
    """
    b = row.clone()
    b.select(0, j).fill_(0.0)  # a fill kernel: item assignment copies from the host
    a = inv[:, j].clone()
    # u = R b, with R = inv - a a^T / a_j the inverse of K without slot j (zero row/col j).
    u = inv @ b - a * (a @ b / a[j])
    u.select(0, j).fill_(0.0)
    s = shift + row[j] - b @ u
    ok = ok & (s >= 0.5 * shift)
    s = torch.where(ok, s, 1.0)
    v = u
    v.select(0, j).fill_(-1.0)
    # inv <- R + v v^T / s: the bordered inverse with the new gradient in slot j.
    p = torch.where(ok, torch.stack([a, v], dim=1), 0.0)
    scale = torch.where(ok, torch.stack([-1.0 / a[j], 1.0 / s]), 0.0)
    inv.addmm_(p * scale, p.T)
    col = -v / s
    inv[:, j] = torch.where(ok, col, a)
    inv[j, :] = torch.where(ok, col, inv[j, :])
    return inv[:, j], ok


def _refine(gram: torch.Tensor, inv: torch.Tensor, col: torch.Tensor, j: int, shift: float):
    """One step of iterative refinement of col = K^{-1} e_j against K itself, O(m^2)."""
    residual = -(gram @ col + shift * col)
    residual.select(0, j).add_(1.0)
    return col + inv @ residual


def _factor(gram: torch.Tensor, inv: torch.Tensor, row: torch.Tensor, j: int, shift: float, ok):
    """Column j of K^{-1} by a fresh Cholesky factorisation, O(k^3): (column, ok).

    With a full window K^{-1} itself is refreshed (where `ok`). The triangular solves
    are cuBLAS calls on a GPU: no solver status is read back to the host.
    """
    k = row.numel()
    mat = gram[:k, :k].clone()
    mat[j, :] = row
    mat[:, j] = row
    mat.diagonal().add_(shift)
    chol, info = torch.linalg.cholesky_ex(mat)
    ok = ok & (info == 0)
    chol = torch.where(ok, chol, torch.eye(k, dtype=F64, device=row.device))
    if k == inv.shape[0]:
        eye = torch.eye(k, dtype=F64, device=row.device)
        half = torch.linalg.solve_triangular(chol, eye, upper=False)  # L^{-1}
        inv.copy_(torch.where(ok, half.T @ half, inv))
        return inv[:, j], ok
    unit = torch.zeros(k, 1, dtype=F64, device=row.device)
    unit.select(0, j).fill_(1.0)
    half = torch.linalg.solve_triangular(chol, unit, upper=False)
    return torch.linalg.solve_triangular(chol.T, half, upper=True)[:, 0], ok


def error_estimate(
    gram: torch.Tensor,
    w: torch.Tensor,
    size: torch.Tensor,
    shift: float,
    accumulation: float,
    storage: float,
) -> torch.Tensor:
    """An estimate of the relative error of u = G^T w (||u|| = `size`), O(k^2), on the device.

    Two terms relative to ||u||: the dot products that build K carry an error of about
    acc ||G||_F^2 (acc: the unit roundoff of the products' accumulation), which K^{-1}
    turns into an error of w of at most ||E|| ||w|| / shift, and G^T maps back with
    ||G^T K^{-1}|| <= 1 / (2 sqrt(shift)); G^T w itself is a sum of terms up to
    sum_i |w_i| ||g_i|| that may cancel, each rounded to the window's precision
    (`storage`: its unit roundoff; a bf16 window rounds every gradient it stores).
    """
    k = w.numel()
    g = gram[:k, :k].diagonal()
    mixing = accumulation * g.sum() * w.norm() / (2 * shift**0.5)
    cancel = storage * (w.abs() @ g.clamp_min(0).sqrt())
    return (mixing + cancel) / size.double().clamp_min(torch.finfo(F64).tiny)


def refactor(system: dict, damp: float) -> bool:
    """Recompute a full window's K^{-1} from the Gram matrix for `damp`; False if K is not PD.

    For loading a window saved with another damp (the Gram matrix does not depend on
    it). Reads the Cholesky status back to the host: call it at load time, not per step.
    """
    gram = system["gram"]
    m = gram.shape[0]
    if system["count"] < m:  # warm-up factors K afresh every step
        return True
    mat = gram + m * damp * torch.eye(m, dtype=F64, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(mat)
    if int(info) != 0:
        return False
    system["inv"].copy_(torch.cholesky_inverse(chol))
    return True
