"""The arithmetic of LASSO channel selection and least-squares reconstruction (He, Zhang and Sun, ICCV 2017), on
streamed sufficient statistics: nothing here sees a sample, only sums over samples.

For one reading layer (a convolution group or an InnerProduct) with weight matrix ``W`` (n outputs x D columns, a
column per input value of a patch) and samples ``x_s`` (D) -> ``y_s`` (n), the statistics are, with
``x~ = [x; 1]``::

    A = sum_s x~ x~^T   ((D+1) x (D+1))      B = sum_s x~ y^T   ((D+1) x n)      yy = sum_s ||y||^2

Every column belongs to an input channel (``columns``: column -> channel id; a 3x3 convolution has 9 columns per
channel, an InnerProduct over C x H x W has H*W). The paper's design matrix stacks, for channel i, the contribution
``Z_i = X_i W_i^T`` (N x n) of that channel alone; its Gram matrix and correlation with the target are functions of A
and B only::

    G_ij = sum_{p in i, q in j} A_pq (W^T W)_pq          (Z^T y)_i = sum_{p in i} sum_o W_op B_po

so LASSO runs on all samples in Gram form (the released code used a random subsample of 400 rows for memory). With
a bias, each output gets its own intercept: the statistics are centred first (the released code fitted one scalar
intercept shared by all outputs). The reconstruction is the least squares over the kept columns and the bias row,
``W~ = (A_KK + eps I)^-1 B_K``, and the reconstruction error of any weights ``W~`` follows from the same sums:
``||Y - X~ W~||^2 = yy - 2 <W~, B> + <W~, A W~>``.

Selection walks the exact LASSO path by Gram-form LARS (:mod:`slim.prune.lars`, scipy's BLAS bindings from the
``.[lasso]`` extra), whose active set grows or shrinks by one channel at a breakpoint, so the first breakpoint with
exactly c' active channels gives the asked count without a search over the penalty, and the path stops there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import numpy as np

from slim.prune.lars import lasso_path

__all__ = ["Selection", "channel_gram", "select_channels", "least_squares", "relative_error", "lars_path", "expand",
           "unexplained"]


def _channel_sums(matrix: np.ndarray, columns: np.ndarray, channels: np.ndarray, axis: int) -> np.ndarray:
    """Sum the rows (axis 0) or columns (axis 1) of ``matrix`` that belong to each of ``channels``.

    Columns come in runs of one channel (a convolution's k_h*k_w, an InnerProduct's H*W): with runs of equal length
    the runs are summed by a reshape (no scatter over the whole matrix), then the few runs of one channel (a Concat
    repeating it) are added up by a small indicator product."""
    D = len(columns)
    starts = np.flatnonzero(np.r_[True, columns[1:] != columns[:-1]])
    m = D // len(starts)
    if m * len(starts) == D and (starts == np.arange(len(starts)) * m).all():
        moved = np.moveaxis(matrix, axis, 0)
        runs = moved.reshape((len(starts), m) + moved.shape[1:]).sum(1)
        run_channel = columns[starts]
    else:
        runs, run_channel = np.moveaxis(matrix, axis, 0), columns
    if np.array_equal(run_channel, channels):
        summed = runs                                           # one run per channel, in order (an FC reader)
    else:
        indicator = (run_channel[None, :] == channels[:, None]).astype(runs.dtype)   # c x runs
        summed = np.tensordot(indicator, runs, axes=(1, 0))
    return np.moveaxis(summed, 0, axis)


def channel_gram(A: np.ndarray, B: np.ndarray, W: np.ndarray, columns: np.ndarray, count: int,
                 center: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The channel-level Gram matrix and correlations of one reading layer's LASSO design.

    Args:
        A, B: the statistics (float64), with the constant row/column last.
        W: the layer's original weights as an n x D matrix.
        columns: channel id of each of the D columns.
        count: the number of samples summed in A and B.
        center: subtract the means (the layer has a bias: each output's intercept is free).

    Returns:
        (channels, G, q): the sorted distinct channel ids, G (c x c) and q = Z^T y (c).
    """
    D = W.shape[1]
    Axx, Bx = A[:D, :D], B[:D]
    if center and count > 0:
        mx, my = A[D, :D] / count, B[D] / count
        Axx = Axx - count * np.outer(mx, mx)
        Bx = Bx - count * np.outer(mx, my)
    channels = np.unique(columns)
    P = Axx * (W.T @ W)                                      # D x D: A_pq (W^T W)_pq
    G = _channel_sums(_channel_sums(P, columns, channels, 0), columns, channels, 1)
    q = _channel_sums((Bx * W.T).sum(1), columns, channels, 0)
    return channels, G, q


@dataclasses.dataclass
class Selection:
    """Which of the candidate channels LASSO keeps, and how it got there.

    Attributes:
        kept: indices into the candidates, sorted.
        alpha: the LASSO penalty at which they are the active set (the objective is ``1/(2 n_rows) ||y - Z beta||^2
            + alpha ||beta||_1``); None when nothing was solved (all kept).
        active: the size of the active set at ``alpha`` (below the asked count when the path ended early and the
            rest was filled by correlation, or above it within --rank-tol).
        filled: channels added by correlation because the path never activated them (their columns are linearly
            dependent on the others or zero).
    """

    kept: np.ndarray
    alpha: Optional[float]
    active: int
    filled: int = 0


def lars_path(G: np.ndarray, q: np.ndarray, n_rows: int,
              until: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The LASSO path of a Gram-form problem: (alphas, decreasing; coefs, c x len(alphas)), up to the first
    breakpoint with ``until`` active channels when given (see :func:`slim.prune.lars.lasso_path`)."""
    scale = float(np.max(np.abs(np.diag(G)))) if G.size else 0.0
    if not scale > 0 or not np.isfinite(scale):
        return np.zeros(1), np.zeros((len(q), 1))
    # The path does not depend on a common scale of G and q (alphas scale with it); unit scale keeps the solver's
    # relative tolerances meaningful whatever the magnitude of the activations.
    alphas, coefs = lasso_path(G / scale, q / scale, max(1, n_rows), until=until)
    return alphas * scale, coefs


def _active_at(alpha: float, alphas: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    """The active set (mask) of the path at ``alpha``: coefficients are linear between breakpoints."""
    if alpha >= alphas[0]:
        return np.zeros(coefs.shape[0], bool)
    if alpha <= alphas[-1]:
        return coefs[:, -1] != 0
    k = int(np.argmax(alphas < alpha))          # alphas[k-1] >= alpha > alphas[k]
    t = (alphas[k - 1] - alpha) / (alphas[k - 1] - alphas[k])
    beta = coefs[:, k - 1] + t * (coefs[:, k] - coefs[:, k - 1])
    return beta != 0


def select_channels(G: np.ndarray, q: np.ndarray, n_rows: int, keep: int,
                    rank_tol: Optional[float] = None) -> Selection:
    """Choose ``keep`` of the c candidate channels by LASSO on the Gram form.

    By default the first breakpoint of the LASSO path with exactly ``keep`` active channels is taken (the count
    changes by one per breakpoint, so it is met exactly unless the path ends first; then the missing channels are
    the remaining ones with the largest correlation |q_i| / sqrt(G_ii), in ``filled``). With ``rank_tol`` the
    released code's search is reproduced instead: the penalty is bisected until the active count lies in
    [keep, keep * (1 + rank_tol)], and that count is kept (it may exceed the request).

    Args:
        G: c x c Gram matrix of the channels' contributions (centred when the layer has a bias).
        q: their correlations with the target.
        n_rows: the number of scalar rows of the stacked problem (samples x outputs), for the penalty's scale.
        keep: how many to keep.
        rank_tol: the released code's tolerance (0.1 there), or None for the exact count.
    """
    c = len(q)
    if keep >= c:
        return Selection(np.arange(c), None, c)
    if keep <= 0:
        return Selection(np.arange(0), None, 0)
    if rank_tol is not None:
        # The search needs the path until the count passes its window, no further.
        alphas, coefs = lars_path(G, q, n_rows, until=min(c, int(math.floor(keep * (1 + rank_tol))) + 1))
        return _search(alphas, coefs, G, q, keep, rank_tol)
    alphas, coefs = lars_path(G, q, n_rows, until=keep)
    counts = (coefs != 0).sum(0)
    hits = np.nonzero(counts == keep)[0]
    if len(hits):
        k = int(hits[0])
        return Selection(np.nonzero(coefs[:, k])[0], float(alphas[k]), keep)
    # The path ended with fewer active channels (the rest are dependent on them, or zero): take its last active set
    # and add the remaining channels that correlate best with the target.
    active = coefs[:, -1] != 0
    return _fill(active, G, q, keep, float(alphas[-1]))


def _fill(active: np.ndarray, G: np.ndarray, q: np.ndarray, keep: int, alpha: float) -> Selection:
    n_active = int(active.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.abs(q) / np.sqrt(np.diag(G)), nan=0.0, posinf=0.0)
    rest = np.nonzero(~active)[0]
    extra = rest[np.argsort(-corr[rest], kind="stable")[:keep - n_active]]
    kept = np.sort(np.concatenate([np.nonzero(active)[0], extra]))
    return Selection(kept, alpha, n_active, len(extra))


def _search(alphas, coefs, G, q, keep: int, tol: float) -> Selection:
    """The released code's penalty search: grow the right end until fewer than ``keep`` are active, then bisect
    until the active count lies in [keep, keep * (1 + tol)]."""
    right = float(alphas[0]) if alphas[0] > 0 else 1.0
    while _active_at(right, alphas, coefs).sum() >= keep:
        right *= 2
    left = 0.0
    for _ in range(200):
        alpha = (left + right) / 2
        active = _active_at(alpha, alphas, coefs)
        k = int(active.sum())
        if k > keep * (1 + tol):
            left = alpha
        elif k < keep:
            right = alpha
        else:
            return Selection(np.nonzero(active)[0], alpha, k)
        if right - left <= 1e-12 * max(right, 1e-300):
            break
    # The path jumps past the window (or ends below the count): the exact-count rule decides instead.
    counts = (coefs != 0).sum(0)
    hits = np.nonzero(counts == keep)[0]
    if len(hits):
        return Selection(np.nonzero(coefs[:, int(hits[0])])[0], float(alphas[int(hits[0])]), keep)
    return _fill(coefs[:, -1] != 0, G, q, keep, float(alphas[-1]))


def least_squares(A: np.ndarray, B: np.ndarray, kept: np.ndarray, bias: bool, ridge: float) -> np.ndarray:
    """The least-squares weights over the kept columns (and the constant row when ``bias``).

    Args:
        A, B: the statistics, constant row last.
        kept: the kept column indices (into the D columns).
        bias: fit an intercept (the layer has a bias blob).
        ridge: Tikhonov term relative to the mean diagonal of A over the kept columns (never on the intercept),
            so a rank-deficient input (a dead channel, a duplicated one) still has a unique, small solution.

    Returns:
        (len(kept) + bias) x n: the weights of the kept columns, then the bias row when ``bias``.
    """
    D = A.shape[0] - 1
    rows = np.concatenate([kept, [D]]) if bias else np.asarray(kept)
    M = A[np.ix_(rows, rows)].copy()
    rhs = B[rows]
    k = len(kept)
    if k:
        scale = float(np.trace(M[:k, :k])) / k
        M[np.arange(k), np.arange(k)] += ridge * scale if scale > 0 else ridge
    try:
        return np.linalg.solve(M, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(M, rhs, rcond=None)[0]


def relative_error(A: np.ndarray, B: np.ndarray, yy: float, weights: np.ndarray) -> float:
    """||Y - X~ W~|| / ||Y|| from the statistics; ``weights`` is (D + 1) x n, the bias row last."""
    if not yy > 0:
        return 0.0
    rows = np.flatnonzero(np.any(weights != 0, axis=1))          # removed columns are zero rows: skip them
    W = weights[rows]
    sq = yy - 2.0 * float((W * B[rows]).sum()) + float((W * (A[np.ix_(rows, rows)] @ W)).sum())
    return math.sqrt(max(sq, 0.0) / yy)


def expand(solution: np.ndarray, kept: np.ndarray, D: int, bias: bool) -> np.ndarray:
    """A least-squares solution as full (D + 1) x n weights: zero rows for removed columns, the bias row last
    (zero without a bias)."""
    out = np.zeros((D + 1, solution.shape[1]))
    out[kept] = solution[:len(kept)]
    if bias:
        out[D] = solution[len(kept)]
    return out



def unexplained(A: np.ndarray, count: int, columns: np.ndarray, usable: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """For each of ``channels``, the fraction of its input variance that the other usable channels do not explain
    linearly: 0 for a channel that is a linear combination of the others (or dead), 1 for one uncorrelated with them
    (and for every channel when the statistics hold no more samples than channels: then nothing can be judged).

    Each channel is summarised by the sum of its columns (a linear functional, so a channel map that is a linear
    combination of others stays one); on the centred covariance S of these summaries the unexplained fraction of
    channel i is ``1 / (S_ii (S^-1)_ii)``, one c x c inversion for every channel. Least squares recovers such a
    channel's contribution from the others: removing it costs nothing once the reader is refitted.

    Args:
        A: the statistics (constant row last); count: the samples in it.
        columns: channel id of each column; usable: mask of the columns to consider (kept channels).
        channels: the channels to rate (each must own usable columns).
    """
    D = len(columns)
    idx = np.nonzero(usable)[0]
    present = np.unique(columns[idx])
    if count <= len(present):
        # Fewer samples than channels: on these samples every channel is a combination of the others, an artefact
        # of the calibration's size, not a redundancy of the net; nothing is judged explained.
        return np.ones(len(channels))
    n = max(count, 1)
    mx = A[D, idx] / n
    C = A[np.ix_(idx, idx)] / n - np.outer(mx, mx)
    S = _channel_sums(_channel_sums(C, columns[idx], present, 0), columns[idx], present, 1)
    diag = np.clip(np.diag(S), 0, None)
    scale = float(diag.mean()) if len(diag) else 0.0
    out = np.zeros(len(channels))
    if not scale > 0:
        return out
    S[np.diag_indices_from(S)] += 1e-12 * scale                  # positive definite: a plain inverse will do
    try:
        inv_diag = np.diag(np.linalg.inv(S))
    except np.linalg.LinAlgError:
        inv_diag = np.diag(np.linalg.pinv(S, hermitian=True))
    at = np.searchsorted(present, channels)
    live = diag[at] > 1e-12 * scale                                # a dead channel: nothing to explain, 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = 1.0 / (diag[at] * inv_diag[at])
    out[live] = np.clip(np.nan_to_num(ratio[live], nan=1.0), 0.0, 1.0)
    return out
