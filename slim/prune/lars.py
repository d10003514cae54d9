"""The LASSO path by least angle regression (Efron, Hastie, Johnstone and Tibshirani, 2004), in Gram form.

The problem is ``min_b 1/(2 n) ||y - Z b||^2 + alpha ||b||_1`` given only ``G = Z^T Z`` (c x c) and ``q = Z^T y``.
Starting from ``b = 0`` at ``alpha = max |q| / n``, the path is piecewise linear in alpha: the active channels all
have residual correlation ``|q - G b|`` equal to ``n alpha``; a channel joins when its correlation reaches theirs and
(the LASSO modification) leaves when its coefficient crosses zero, so the active count changes by one at each
breakpoint.

Why slim walks the path itself rather than with scikit-learn's ``lars_path_gram`` (which it used before and which the
tests compare against): at a few thousand channels scikit-learn's solver spends nearly all its time copying -- each
step re-lays the active Cholesky factor for a solve and multiplies through a strided view of the Gram matrix that
numpy does not hand to BLAS -- 43 ms a step where the arithmetic needs 3 (4,096 channels, 2,048 active), and it
always walks on past the count asked for (benchmarks/bench_lars.py: 472 s against 7.8 s). Its path also stops at an
absolute penalty (float32 epsilon), which a calibration of millions of rows reaches long before the asked count.
Here the factor is kept packed (row-major lower = column-major packed upper, so appending a row is appending to an
array, and BLAS's ``tpsv`` solves in place), the Gram rows of the active channels are kept first so the correlation
update is one contiguous ``gemv``, the path stops at the asked count, and the forward solve for the equiangular
direction is updated by one element per step.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from slim.errors import PruneError

__all__ = ["lasso_path", "require_solver"]

# A channel whose column is this close to the span of the active ones (relative squared residual) never joins:
# its Cholesky pivot would be noise.
_DEGENERATE = 1e-12
# A channel joins when its correlation is within this fraction of the active ones' (a breakpoint, up to rounding).
_TIE = 1e-6
# The path ends when the correlation has fallen to this fraction of where it started (an exact fit).
_END = 1e-12


def require_solver():
    """scipy's ``dtpsv``, or a PruneError that says how to install it (checked before any calibration pass)."""
    try:
        from scipy.linalg.blas import dtpsv
    except ImportError:
        raise PruneError("--criterion lasso walks the LASSO path with scipy's BLAS bindings, which are not installed. "
                         "Install them with `pip install 'slim[lasso]'` (or `pip install scipy`).") from None
    return dtpsv


def lasso_path(G: np.ndarray, q: np.ndarray, n_rows: int,
               until: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The LASSO path of a Gram-form problem, breakpoint by breakpoint.

    Args:
        G: c x c Gram matrix (symmetric positive semi-definite).
        q: the correlations Z^T y (c).
        n_rows: n, the rows of the stacked problem (scales alpha only).
        until: stop at the first breakpoint with this many active channels (the path up to there is the same as
            the whole path's); None walks to the end.

    Returns:
        (alphas, coefs): alphas decreasing (len m), coefs c x m, the coefficients at each breakpoint; a channel that
        left the active set at a breakpoint is zero there. A channel in the span of the active ones (a duplicate,
        a dead one) never joins, so the path may end, at alpha 0 or an exact fit, with fewer than c (or ``until``)
        channels active.
    """
    dtpsv = require_solver()
    q = np.asarray(q, np.float64)
    c = len(q)
    n = max(1, int(n_rows))
    cap = c if until is None else max(0, min(int(until), c))
    steps = 10 * c + 10                                             # a bound: joins and leaves, with slack

    Gw = np.array(G, dtype=np.float64, order="C", copy=True)      # rows reordered: the active channels' rows first
    diag = np.diag(Gw).copy()
    row_of = np.arange(c)                                           # row of Gw holding each channel
    channel_at = np.arange(c)                                       # channel whose row is at each row of Gw
    top = float(diag.max()) if c else 0.0
    usable = diag > 1e-14 * top if top > 0 else np.zeros(c, bool)   # a zero column never correlates

    packed = np.empty(cap * (cap + 1) // 2 + 1)                     # rows of L, G_AA = L L^T, one after another
    y = np.empty(cap + 1)                                           # L^-1 s_A, grown by one entry per join
    active = np.zeros(c, bool)
    order = []                                                      # active channels in the factor's order
    sign = np.zeros(c)
    beta = np.zeros(c)
    r = q.copy()                                                    # residual correlations q - G b

    C = float(np.abs(r[usable]).max()) if usable.any() else 0.0
    start = C
    alphas, coefs = [C / n], [beta.copy()]
    left = -1                                                       # the channel that left at the last breakpoint
    dropped = False
    for _ in range(steps):
        if not C > _END * start or len(order) >= cap and not dropped:
            break
        k = len(order)
        while not dropped:
            free = usable & ~active
            if not free.any():
                break
            j = int(np.argmax(np.where(free, np.abs(r), -1.0)))
            if k and abs(r[j]) < (1.0 - _TIE) * C:
                break                                               # the channel due here was degenerate: none joins
            g = Gw[:k, j].copy()
            row = dtpsv(k, packed, g, lower=0, trans=1) if k else g
            pivot = diag[j] - float(row @ row)
            if pivot <= _DEGENERATE * diag[j]:
                usable[j] = False                                   # in the span of the active ones: never joins
                continue
            at = k * (k + 1) // 2
            packed[at:at + k] = row
            packed[at + k] = np.sqrt(pivot)
            sign[j] = np.sign(r[j]) or 1.0
            y[k] = (sign[j] - float(row @ y[:k])) / packed[at + k]
            _swap_rows(Gw, row_of, channel_at, k, j)
            active[j] = True
            order.append(j)
            k += 1
            break
        dropped = False
        if k == 0:
            break
        w = dtpsv(k, packed, y[:k].copy(), lower=0, trans=0)       # G_AA^-1 s_A
        AA = 1.0 / np.sqrt(float(y[:k] @ y[:k]))                    # s_A^T G_AA^-1 s_A = |L^-1 s_A|^2
        d = AA * w                                                  # d b_A / d gamma
        a = d @ Gw[:k]                                              # d (G b) / d gamma, every channel

        gamma = C / AA                                              # all the way to alpha = 0
        free = usable & ~active
        if free.any():
            rf, af = r[free], a[free]
            with np.errstate(divide="ignore", invalid="ignore"):
                g1 = np.maximum(C - rf, 0.0) / (AA - af)            # r_j reaches +C
                g2 = np.maximum(C + rf, 0.0) / (AA + af)            # r_j reaches -C
            if left >= 0:
                # The channel that just left sits at its old sign's bound: it may come back only at the other.
                at = int(np.count_nonzero(free[:left]))
                (g1 if sign[left] > 0 else g2)[at] = np.inf
            g1[~(g1 > 0) | ~np.isfinite(g1)] = np.inf
            g2[~(g2 > 0) | ~np.isfinite(g2)] = np.inf
            gamma = min(gamma, float(g1.min()), float(g2.min()))
        idx = np.asarray(order)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = -beta[idx] / d
        z[~(z > 0) | ~np.isfinite(z)] = np.inf
        leaver = int(np.argmin(z))
        if z[leaver] < gamma:
            gamma = float(z[leaver])
            dropped = True

        beta[idx] += gamma * d
        r -= gamma * a
        C_new = C - gamma * AA
        if C_new > C:                                               # rounding turned the path back: stop
            break
        C = max(C_new, 0.0)
        left = -1
        if dropped:
            ch = order[leaver]
            beta[ch] = 0.0
            active[ch] = False
            left = ch
            _remove(packed, Gw, row_of, channel_at, order, leaver)
            k -= 1
            y[:k] = dtpsv(k, packed, sign[np.asarray(order)], lower=0, trans=1) if k else y[:0]
        alphas.append(C / n)
        coefs.append(beta.copy())
    return np.asarray(alphas), np.stack(coefs, axis=1)


def _swap_rows(Gw: np.ndarray, row_of: np.ndarray, channel_at: np.ndarray, k: int, j: int) -> None:
    """Bring channel j's Gram row to row k (the next active slot)."""
    p = row_of[j]
    if p != k:
        Gw[[k, p]] = Gw[[p, k]]
        other = channel_at[k]
        channel_at[k], channel_at[p] = j, other
        row_of[j], row_of[other] = k, p


def _remove(packed: np.ndarray, Gw: np.ndarray, row_of: np.ndarray, channel_at: np.ndarray, order: list,
            p: int) -> None:
    """Take the p-th active channel out of the factor and the active rows.

    Deleting row and column p of G_AA leaves L's trailing block T with T' T'^T = T T^T + l l^T (l: L's column p
    below the diagonal), a rank-one Cholesky update done by Givens rotations."""
    k = len(order)
    rows, cols = np.tril_indices(k)
    L = np.zeros((k, k))
    L[rows, cols] = packed[:len(rows)]
    l = L[p + 1:, p].copy()
    L = np.delete(np.delete(L, p, 0), p, 1)
    T = np.asfortranarray(L[p:, p:])
    for t in range(len(l)):
        a, b = T[t, t], l[t]
        h = np.hypot(a, b)
        cos, sin = h / a, b / a
        T[t, t] = h
        if t + 1 < len(l):
            T[t + 1:, t] = (T[t + 1:, t] + sin * l[t + 1:]) / cos
            l[t + 1:] = cos * l[t + 1:] - sin * T[t + 1:, t]
    L[p:, p:] = T
    rows, cols = np.tril_indices(k - 1)
    packed[:len(rows)] = L[rows, cols]

    ch = order.pop(p)
    moved = Gw[p].copy()
    Gw[p:k - 1] = Gw[p + 1:k]
    Gw[k - 1] = moved
    channel_at[p:k - 1] = channel_at[p + 1:k]
    channel_at[k - 1] = ch
    row_of[channel_at[p:k]] = np.arange(p, k)
