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
  rounding has eaten the precision, and the step falls back to refactoring);
* the column of K^{-1} used for the step then gets one step of iterative refinement
  against K itself (two more O(m^2) products): the explicit-inverse updates lose
  about cond(K) * 1e-16 per step within a lap, the refined column is as accurate as a
  fresh Cholesky solve;
* once per lap of the window (slot m-1), K^{-1} is recomputed from `gram` with a
  Cholesky factorisation, O(m^3) once every m steps = O(m^2) amortised, so the
  rounding of the updates never accumulates across laps;
* warm-up (k < m gradients so far): the shift k*damp grows with k, which is not a
  low-rank change, so K is factored afresh each step, O(k^3) (the first m steps only).
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
    system: dict, dots: torch.Tensor, sq: torch.Tensor | float, damp: float
) -> tuple[int, torch.Tensor] | None:
    """Take a new gradient g into the slot of the oldest one.

    `dots[i] = <g, g_i>` over the slots filled so far (min(count, m) of them, the
    evicted slot's entry included and ignored), `sq = <g, g>`. Returns `(slot, w)`
    with F^{-1} g = G^T w over the rows G of the window after g is written into `slot`,
    or None (nothing changed) when K is not numerically positive definite.
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

    col = None
    if count >= m and slot != m - 1:
        col = _replace(inv, row, slot, shift)
    updated = col is not None
    if not updated:
        col = _factor(gram, inv, row, slot, shift)
        if col is None:
            return None
    gram[slot, :k] = row
    gram[:k, slot] = row
    system["count"] = count + 1
    if updated:
        col = _refine(gram, inv, col, slot, shift)
    return slot, k * col


def _replace(inv: torch.Tensor, row: torch.Tensor, j: int, shift: float):
    """Swap slot j of a full window's K^{-1} in place, O(m^2); None if precision is lost."""
    b = row.clone()
    b[j] = 0.0
    a = inv[:, j].clone()
    # u = R b, with R = inv - a a^T / a_j the inverse of K without slot j (zero row/col j).
    u = inv @ b - a * (a @ b / a[j])
    u[j] = 0.0
    s = shift + row[j] - b @ u
    if not bool(s >= 0.5 * shift):
        return None
    v = u
    v[j] = -1.0
    # inv <- R + v v^T / s: the bordered inverse with the new gradient in slot j.
    p = torch.stack([a, v], dim=1)
    scale = torch.stack([-1.0 / a[j], 1.0 / s])
    inv.addmm_(p * scale, p.T)
    inv[:, j] = -v / s
    inv[j, :] = -v / s
    return inv[:, j]


def _refine(gram: torch.Tensor, inv: torch.Tensor, col: torch.Tensor, j: int, shift: float):
    """One step of iterative refinement of col = K^{-1} e_j against K itself, O(m^2)."""
    residual = -(gram @ col + shift * col)
    residual[j] += 1.0
    return col + inv @ residual


def _factor(gram: torch.Tensor, inv: torch.Tensor, row: torch.Tensor, j: int, shift: float):
    """Column j of K^{-1} by a fresh Cholesky factorisation, O(k^3); None if K is not PD."""
    k = row.numel()
    mat = gram[:k, :k].clone()
    mat[j, :] = row
    mat[:, j] = row
    mat.diagonal().add_(shift)
    chol, info = torch.linalg.cholesky_ex(mat)
    if int(info) != 0:
        return None
    if k == inv.shape[0]:
        inv.copy_(torch.cholesky_inverse(chol))
        return inv[:, j]
    unit = torch.zeros(k, 1, dtype=F64, device=row.device)
    unit[j] = 1.0
    return torch.cholesky_solve(unit, chol)[:, 0]
