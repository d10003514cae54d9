"""The data-driven fits of one decomposed layer on its calibration samples, and its data-free factors
(slim.decompose.factor's arithmetic applied to a plan's blobs).

Spatial and 3c: the horizontal layer is refitted by least squares on the vertical layer's outputs, ReLU-aware where a
ReLU follows; 3c then splits it across channels by the GSVD of its refitted responses. Channel: the GSVD of the layer's
responses on the current inputs. Every fit keeps the layer's bias (an intercept). A fit with too few samples for its
unknowns keeps the data-free factors (``VALIDATE``), and the record says so.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from slim.decompose import factor
from slim.decompose.calibration import Samples
from slim.decompose.ranks import energy
from slim.decompose.report import LayerDecomposition
from slim.decompose.rewrite import LayerPlan

__all__ = ["VALIDATE", "data_free", "fit_layer"]


def _matrix(weight: np.ndarray, bias: Optional[np.ndarray]) -> np.ndarray:
    """(D + 1) x n weights, bias row last, from Caffe blobs."""
    w = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    return np.concatenate([w.T, b[None]], 0)


def _apply(X: torch.Tensor, W: np.ndarray) -> torch.Tensor:
    Wt = torch.as_tensor(W, dtype=X.dtype, device=X.device)
    return X @ Wt[:-1] + Wt[-1]


def _errs(Y_hat: torch.Tensor, Y: torch.Tensor) -> Tuple[float, float]:
    return factor.errors(Y_hat, Y)


def _channel_apply(Y: torch.Tensor, bias: np.ndarray, cf: factor.ChannelFactors) -> torch.Tensor:
    """A channel decomposition applied to responses ``Y`` of a layer with bias ``bias``."""
    T = torch.as_tensor(cf.transform(), dtype=Y.dtype, device=Y.device)
    return (Y - torch.as_tensor(bias, dtype=Y.dtype, device=Y.device)) @ T + torch.as_tensor(
        cf.bias, dtype=Y.dtype, device=Y.device)


def _set_channel(blobs, plan: LayerPlan, weight: np.ndarray, cf: factor.ChannelFactors) -> None:
    """Body = L^T W (d' filters, no bias), mix = (S R)^T with the fitted bias."""
    W = np.asarray(weight, np.float64)
    body = (cf.combine.T @ W.reshape(W.shape[0], -1)).reshape((cf.rank,) + W.shape[1:])
    blobs[plan.body] = [body.astype(np.float32)]
    blobs[plan.mix] = [cf.mix.reshape(cf.mix.shape + (1, 1)).astype(np.float32), cf.bias.astype(np.float32)]


def data_free(plan: LayerPlan, weight: np.ndarray, bias: Optional[np.ndarray], blobs) \
        -> Tuple[Optional[factor.SpatialFactors], float]:
    """The data-free factors of one plan into ``blobs``; returns the spatial split (None for "channel") and the
    fraction of the squared singular values the rank keeps (the spatial split's, or the weights' for "channel")."""
    b = np.zeros(weight.shape[0], np.float32) if bias is None else np.asarray(bias, np.float32)
    if plan.method == "channel":
        cf = factor.channel_svd(weight, plan.rank, b)
        _set_channel(blobs, plan, weight, cf)
        return None, float(energy(cf.spectrum)[min(plan.rank, len(cf.spectrum)) - 1])
    f = factor.spatial_split(weight, plan.rank)
    blobs[plan.vertical] = [f.vertical]
    if plan.method == "spatial":
        blobs[plan.body] = [f.horizontal, b.copy()]
    else:
        _set_channel(blobs, plan, f.horizontal, factor.channel_svd(f.horizontal, plan.channel_rank, b))
    return f, float(energy(f.singular_values)[plan.rank - 1])


#: Below this many samples per unknown of a fit, the fit must first beat the data-free factors on the last fifth of
#: the fit samples (fitted on the rest), or they are kept: a least squares on barely more samples than unknowns
#: overfits, and the held-out error would rise instead of fall.
VALIDATE = 10


def _validated(N: int, unknowns: int, fit, error_of, data_free, what: str, notes: List[str]):
    """``fit(lo, hi)`` on the fit samples [lo, hi), or ``data_free`` when there are too few samples for it (see
    VALIDATE); ``error_of(model, lo, hi)`` is the error on fit samples [lo, hi)."""
    if N < unknowns:
        notes.append(f"{what} needs {unknowns} samples (its unknowns per output), the calibration gave {N}: its "
                     f"data-free factors are kept (raise --calib-images)")
        return data_free
    if N < VALIDATE * unknowns:
        cut = N * 4 // 5
        if cut < unknowns or error_of(fit(0, cut), cut, N) >= error_of(data_free, cut, N):
            notes.append(f"{what}: with {N} samples for {unknowns} unknowns per output, the fit did not beat the "
                         f"data-free factors on the last fifth of the fit samples; they are kept (raise "
                         f"--calib-images)")
            return data_free
    return fit(0, N)


def fit_layer(plan: LayerPlan, samples: Samples, weight: np.ndarray, bias: Optional[np.ndarray],
         spatial: Optional[factor.SpatialFactors], blobs, relu: bool, calibration, record: LayerDecomposition) -> None:
    """The data-driven fits of one plan on its samples; ``blobs`` updated, errors recorded (held-out). A fit with
    too few samples for its unknowns (D + 1 for the horizontal least squares, n + 1 for the GSVD; see VALIDATE)
    is not made: the data-free factors stay, and the record's note says so."""
    (Xf, Xh), (Yf, Yh) = samples.X, samples.Y
    ridge = calibration.ridge
    N = Xf.shape[0]
    record.samples = [N, Xh.shape[0]]
    pick = (lambda e: e[1]) if relu else (lambda e: e[0])
    notes: List[str] = []

    def channel(R_fit, R_held, R_held0, b0, b, body_weight, body_weight0, rank):
        """The channel split of a body whose responses are R (bias b), against the data-free split of its data-free
        version (responses R_held0, bias b0, weight body_weight0)."""
        n = R_fit.shape[1]
        svd = factor.channel_svd(body_weight, rank, b)
        cf = _validated(N, n + 1, lambda lo, hi: factor.channel_gsvd(R_fit[lo:hi], Yf[lo:hi], rank, b, relu),
                        lambda m, lo, hi: pick(_errs(_channel_apply(R_fit[lo:hi], b, m), Yf[lo:hi])), svd,
                        "the channel decomposition", notes)
        e0 = _errs(_channel_apply(R_held0, b0, factor.channel_svd(body_weight0, rank, b0)), Yh)
        e1 = _errs(_channel_apply(R_held, b, cf), Yh)
        record.stages["channel"] = {"svd": pick(e0), "fit": pick(e1)}
        _set_channel(blobs, plan, body_weight, cf)
        return e0, e1

    if plan.method == "channel":
        W = _matrix(weight, bias)
        b = W[-1]
        Rf, Rh = _apply(Xf, W), _apply(Xh, W)                   # the layer whole, on the current inputs
        e0, e1 = channel(Rf, Rh, Rh, b, b, weight, weight, plan.rank)
        record.stages["channel"]["input"] = pick(_errs(Rh, Yh))
    else:
        f = spatial
        H0 = _matrix(f.horizontal, bias)
        e0 = _errs(_apply(Xh, H0), Yh)

        def horizontal(lo, hi):
            linear = factor.least_squares_fit(Xf[lo:hi], Yf[lo:hi], ridge)
            if not relu:
                return linear
            nonlinear = factor.relu_least_squares(Xf[lo:hi], Yf[lo:hi], ridge)
            # The relaxation is a heuristic: keep whichever fits the post-ReLU responses better on its samples.
            better = _errs(_apply(Xf[lo:hi], nonlinear), Yf[lo:hi])[1] <= _errs(_apply(Xf[lo:hi], linear),
                                                                                 Yf[lo:hi])[1]
            return nonlinear if better else linear

        H1 = _validated(N, Xf.shape[1] + 1, horizontal,
                        lambda m, lo, hi: pick(_errs(_apply(Xf[lo:hi], m), Yf[lo:hi])), H0,
                        "the horizontal layer's least squares", notes)
        e1 = _errs(_apply(Xh, H1), Yh)
        record.stages["spatial"] = {"svd": pick(e0), "fit": pick(e1)}
        n, d, _, kw = f.horizontal.shape
        h_weight = H1[:-1].T.reshape(n, d, 1, kw).astype(np.float32)
        h_bias = H1[-1].astype(np.float32)
        if plan.method == "spatial":
            blobs[plan.body] = [h_weight, h_bias]
        else:
            e0, e1 = channel(_apply(Xf, H1), _apply(Xh, H1), _apply(Xh, H0), H0[-1], h_bias, h_weight,
                             f.horizontal, plan.channel_rank)
    record.error_svd, record.error_fit = e0[0], e1[0]
    if relu:
        record.error_svd_relu, record.error_fit_relu = e0[1], e1[1]
    record.note = "; ".join(notes)


