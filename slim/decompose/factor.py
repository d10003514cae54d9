"""The arithmetic of 3C decomposition (He, Zhang and Sun, ICCV 2017, section 4.1; Jaderberg et al. 2014; Zhang et
al. 2016), on weights and on sample matrices. Nothing here knows about nets or files.

Spatial decomposition: a k_h x k_w convolution with weight ``W`` (n, c, k_h, k_w) is the matrix
``M[(c', y), (n', x)] = W[n', c', y, x]`` of size (c k_h) x (n k_w); its truncated SVD ``M ~ U_d S_d V_d^T`` gives a
vertical k_h x 1 convolution with d filters (``U_d sqrt(S_d)``) and a horizontal 1 x k_w convolution with n filters
(``sqrt(S_d) V_d^T``), exact at d = min(c k_h, n k_w). The singular values are split evenly between the two so
neither layer's activations grow with the spectrum.

Data-driven fits take samples ``X`` (N x D, the horizontal layer's input patches, or the layer's own) and the
original net's pre-activation responses ``Y_o`` (N x n) at the same positions:

* ``relu_least_squares``: Zhang et al.'s nonlinear least squares, ``min sum ||r(y_o) - r(W x + b)||^2`` with
  r = ReLU, relaxed with an auxiliary ``U`` (``+ lam ||u - (W x + b)||^2``) and solved by alternating a linear
  least squares for (W, b) with an element-wise closed form for U (``relu_step``); lam = 0.1 for 30 iterations,
  then 1 for 20 (``SCHEDULE``), U starting at y_o;
* ``channel_gsvd``: the rank-d' channel decomposition, ``min ||Z - r((Y - mean Y) T + mean U)||^2`` over rank-d' T
  (n x n), Z = r(Y_o), with the same relaxation; its T-step is a reduced-rank regression of U on the centred
  current responses, computed here from n x n Gram matrices (``T = P Q Q^T`` with P the full least-squares map and
  Q the top right singular vectors of ``G P``), never from an N x n SVD. Without a ReLU it is one T-step with
  U = Y_o: plain reduced-rank regression, optimal for the linear error. The result factors as ``T = L S R``: the
  layer keeps d' filters (combinations ``L^T W`` of the old ones) and a 1 x 1 layer maps them back to n outputs with
  weights ``(S R)^T`` and a bias.

Heavy products run in torch on the samples' device, in the samples' dtype; Gram matrices and solves in float64.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["SCHEDULE", "SpatialFactors", "ChannelFactors", "spatial_matrix", "spatial_spectrum", "spatial_split",
           "relu_step", "least_squares_fit", "relu_least_squares", "channel_gsvd", "channel_svd", "errors"]

#: (lambda, iterations) of the relaxation, in order (the released code's schedule).
SCHEDULE: Tuple[Tuple[float, int], ...] = ((0.1, 30), (1.0, 20))


@dataclasses.dataclass
class SpatialFactors:
    """A spatial split: ``vertical`` (d, c, k_h, 1) and ``horizontal`` (n, d, 1, k_w) Caffe weight blobs, and the
    whole singular spectrum of the reshaped weight (descending)."""

    vertical: np.ndarray
    horizontal: np.ndarray
    singular_values: np.ndarray


@dataclasses.dataclass
class ChannelFactors:
    """A rank-d' channel decomposition of a layer with n outputs.

    Attributes:
        combine: n x d' (L): the new first layer's filters are ``combine.T @ W`` (no bias).
        mix: n x d': the 1 x 1 layer's weights (``(S R)^T``).
        bias: n: the 1 x 1 layer's bias (the old bias carried through, plus the fitted offset).
        spectrum: the weight matrix's singular values (the data-free decomposition's), else None.
    """

    combine: np.ndarray
    mix: np.ndarray
    bias: np.ndarray
    spectrum: Optional[np.ndarray] = None

    @property
    def rank(self) -> int:
        return self.combine.shape[1]

    def transform(self) -> np.ndarray:
        """T = L S R (n x n): responses ``y`` (with the old bias) map to ``y T + offset``."""
        return self.combine @ self.mix.T


def spatial_matrix(weight: np.ndarray) -> np.ndarray:
    """``M[(c', y), (n', x)] = W[n', c', y, x]``: (c k_h) x (n k_w), float64."""
    n, c, kh, kw = weight.shape
    return np.asarray(weight, np.float64).transpose(1, 2, 0, 3).reshape(c * kh, n * kw)


def spatial_spectrum(weight: np.ndarray) -> np.ndarray:
    """The singular values of ``spatial_matrix(weight)``, descending (what the rank of a split keeps)."""
    return np.linalg.svd(spatial_matrix(weight), compute_uv=False)


def spatial_split(weight: np.ndarray, rank: int) -> SpatialFactors:
    """The truncated-SVD split of a (n, c, k_h, k_w) weight into vertical and horizontal blobs of rank ``rank``."""
    n, c, kh, kw = weight.shape
    U, s, Vt = np.linalg.svd(spatial_matrix(weight), full_matrices=False)
    root = np.sqrt(s[:rank])
    vertical = (U[:, :rank] * root).T.reshape(rank, c, kh, 1)                 # [k, c', y]
    horizontal = (root[:, None] * Vt[:rank]).reshape(rank, n, kw)             # [k, n', x]
    horizontal = horizontal.transpose(1, 0, 2).reshape(n, rank, 1, kw)
    return SpatialFactors(vertical.astype(np.float32), horizontal.astype(np.float32), s)


def relu_step(z: torch.Tensor, u_hat: torch.Tensor, lam: float) -> torch.Tensor:
    """The element-wise U-step: argmin_u (r(u) - z)^2 + lam (u - u_hat)^2 with z = r(y_o) >= 0, by its two cases
    (u <= 0: u = min(u_hat, 0); u > 0: u = max((lam u_hat + z) / (lam + 1), 0)), whichever costs less."""
    u0 = torch.clamp(u_hat, max=0)
    u1 = torch.clamp((lam * u_hat + z) / (lam + 1), min=0)
    c0 = z * z + lam * (u0 - u_hat) ** 2
    c1 = (u1 - z) ** 2 + lam * (u1 - u_hat) ** 2
    return torch.where(c0 <= c1, u0, u1)


def _with_ones(X: torch.Tensor) -> torch.Tensor:
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype, device=X.device)], 1)


class _Solver:
    """(X~^T X~ + ridge)^-1 for repeated right-hand sides; X~ = [X, 1]; the ridge is relative to the mean diagonal
    of the non-constant columns and never touches the intercept (as slim.prune.lasso.least_squares)."""

    def __init__(self, X: torch.Tensor, ridge: float):
        self.Xt = _with_ones(X)
        A = self.Xt.T.to(torch.float64) @ self.Xt.to(torch.float64)
        D = A.shape[0] - 1
        scale = float(torch.diagonal(A)[:D].mean()) if D else 0.0
        idx = torch.arange(D, device=A.device)
        A[idx, idx] += ridge * scale if scale > 0 else ridge
        self.chol, info = torch.linalg.cholesky_ex(A)
        self.singular = A if int(info) else None   # not positive definite (a zero column, no ridge): lstsq instead

    def solve(self, U: torch.Tensor) -> torch.Tensor:
        """(D + 1) x n weights, the bias row last: the least squares of ``U`` on X~."""
        B = (self.Xt.T @ U.to(self.Xt.dtype)).to(torch.float64)
        if self.singular is not None:
            return torch.linalg.lstsq(self.singular.cpu(), B.cpu(), driver="gelsd").solution.to(B.device)
        return torch.cholesky_solve(B, self.chol)

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        return self.Xt @ W.to(self.Xt.dtype)


def least_squares_fit(X: torch.Tensor, Y: torch.Tensor, ridge: float) -> np.ndarray:
    """The linear least squares of ``Y`` on [X, 1]: (D + 1) x n float64 numpy, the bias row last."""
    return _Solver(X, ridge).solve(Y).cpu().numpy()


def relu_least_squares(X: torch.Tensor, Y: torch.Tensor, ridge: float,
                       schedule: Sequence[Tuple[float, int]] = SCHEDULE) -> np.ndarray:
    """Zhang et al.'s ReLU-aware least squares of the pre-activation targets ``Y`` (N x n) on [X, 1].

    Returns:
        (D + 1) x n float64 numpy weights, the bias row last, from the last W-step.
    """
    solver = _Solver(X, ridge)
    z = torch.clamp(Y, min=0)
    U = Y.clone()
    W = solver.solve(U)
    for lam, iterations in schedule:
        for _ in range(iterations):
            U = relu_step(z, solver.apply(W), lam)
            W = solver.solve(U)
    return W.cpu().numpy()


def _pinv_psd(A: torch.Tensor, rcond: float = 1e-6) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix, eigenvalues below ``rcond`` x the largest dropped (scipy's
    ``pinv(x, 1e-6)`` of the released code)."""
    w, Q = torch.linalg.eigh(A)
    top = float(w.max()) if w.numel() else 0.0
    keep = w > rcond * top if top > 0 else torch.zeros_like(w, dtype=torch.bool)
    inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w))
    return (Q * inv) @ Q.T


def channel_gsvd(Y: torch.Tensor, Y_orig: torch.Tensor, rank: int, bias: np.ndarray, relu: bool,
                 schedule: Sequence[Tuple[float, int]] = SCHEDULE) -> ChannelFactors:
    """The data-driven rank-``rank`` channel decomposition of a layer.

    Args:
        Y: N x n current responses of the layer (with its bias ``bias``).
        Y_orig: N x n original pre-activation responses (the targets).
        rank: d', the filters kept.
        bias: the layer's bias (n), carried into the 1 x 1 layer.
        relu: the layer is followed by a ReLU: fit r(.) (the relaxation); else one reduced-rank regression.
    """
    n = Y.shape[1]
    f64 = torch.float64
    ybar = Y.to(f64).mean(0)
    G = Y - ybar.to(Y.dtype)
    GtG = G.T.to(f64) @ G.to(f64)
    GtG_inv = _pinv_psd(GtG)
    z = torch.clamp(Y_orig, min=0)
    U = Y_orig.clone()
    steps = [(lam, it) for lam, it in schedule] if relu else [(None, 1)]
    T = ubar = None
    for lam, iterations in steps:
        for _ in range(iterations):
            ubar = U.to(f64).mean(0)
            P = GtG_inv @ (G.T @ (U - ubar.to(U.dtype)).to(G.dtype)).to(f64)   # the full least-squares map
            w, Q = torch.linalg.eigh(P.T @ GtG @ P)          # right singular vectors of G P
            Qd = Q[:, torch.argsort(w, descending=True)[:rank]]
            T = P @ Qd @ Qd.T
            if lam is not None:
                U = relu_step(z, (G @ T.to(G.dtype)) + ubar.to(G.dtype), lam)
    L, s, Vt = torch.linalg.svd(P @ Qd, full_matrices=False)   # T = L diag(s) (Vt Qd^T)
    R = Vt @ Qd.T
    b = torch.as_tensor(np.asarray(bias, np.float64), device=T.device)
    offset = ubar - ybar @ T + b @ T
    return ChannelFactors(L.cpu().numpy(), (s[:, None] * R).T.cpu().numpy(), offset.cpu().numpy())


def channel_svd(weight: np.ndarray, rank: int, bias: np.ndarray) -> ChannelFactors:
    """The data-free rank-``rank`` channel decomposition: the top left singular vectors Q of the n x D weight
    matrix (``T = Q Q^T``, the best rank-d' approximation of the weights), the bias carried whole."""
    Wm = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    U, s, _ = np.linalg.svd(Wm, full_matrices=rank > min(Wm.shape))   # more filters than columns: all of U
    Q = U[:, :rank]
    return ChannelFactors(Q, Q.copy(), np.asarray(bias, np.float64).copy(), s)


def errors(Y_hat: torch.Tensor, Y_orig: torch.Tensor) -> Tuple[float, float]:
    """(||Y_o - Y^|| / ||Y_o||, ||r(Y_o) - r(Y^)|| / ||r(Y_o)||) over all samples and outputs."""
    f64 = torch.float64

    def rel(a, b):
        den = float((b.to(f64) ** 2).sum())
        return math.sqrt(float(((a.to(f64) - b.to(f64)) ** 2).sum()) / den) if den > 0 else 0.0

    return rel(Y_hat, Y_orig), rel(torch.clamp(Y_hat, min=0), torch.clamp(Y_orig, min=0))
