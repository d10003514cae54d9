"""The decomposition report: per decomposed convolution, its ranks, its MACs before and after, and its relative
reconstruction errors ||Y - Y_hat|| / ||Y|| on held-out calibration samples, stage by stage; totals; the policy.

Written as JSON next to the decomposed net (``OUT.json``). Example (``print(report)``)::

    decomposed VGG_ILSVRC_16_layers by 3c (2 layers): conv+FC MACs per image 3.70G -> 2.61G (1.42x)
      errors ||Y - Y_hat|| / ||Y|| on 640 held-out samples per layer (after a ReLU where one follows)
      layer      chain                          d    d'   outputs  MACs before  MACs after  data-free  fitted  final
      conv2_1    conv2_1_v, conv2_1_h, _p      49    49   128->111      1.85G       0.52G      0.412    0.225   0.231
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional, Union

from slim.io.atomic import atomic_write

__all__ = ["LayerDecomposition", "DecomposeReport"]

_FORMAT = "slim-decompose-report"
_VERSION = 1


@dataclasses.dataclass
class LayerDecomposition:
    """One decomposed convolution.

    Attributes:
        layer: the original convolution.
        method: "spatial", "channel" or "3c".
        layers: the layers that replace it in the written net, in order.
        rank: d (spatial, 3c) or d' (channel); channel_rank: d' in 3c.
        outputs: the original output count; kept_outputs: after 3C's channel pruning (None: not pruned).
        folded: the 1 x 1 layer was folded back (combineHP).
        relu: a ReLU follows, so the fits were ReLU-aware and the ``*_relu`` errors are after it.
        macs_before, macs_after: multiply-accumulates per image of the layer and of its replacement.
        error_svd, error_fit: held-out relative error of the layer's output with the data-free SVD factors and after
            the data-driven fits (least squares of the horizontal layer, GSVD of the channel decomposition), both on
            the current net's inputs (upstream changes included); None without calibration data.
        error_svd_relu, error_fit_relu: the same after the ReLU (None without one).
        error_final, error_final_relu: the same for the written net (after pruning and folding; on the kept
            outputs; sampled on the held-out images by a last pass).
        stages: per stage ("spatial", "channel"): {"svd": error, "fit": error} (after the ReLU where one follows).
        samples: fit and held-out samples (output positions) of the fits.
        spectrum_kept: the fraction of the squared singular values the rank keeps (of the spatial split's
            (c k_h) x (n k_w) matrix, or for "channel" of the n x (c k_h k_w) weights).
        note: why a fit was not made (too few samples), if so.
    """

    layer: str
    method: str
    layers: List[str]
    rank: int
    channel_rank: Optional[int]
    outputs: int
    kept_outputs: Optional[int]
    folded: bool
    relu: bool
    macs_before: float
    macs_after: float
    error_svd: Optional[float] = None
    error_fit: Optional[float] = None
    error_svd_relu: Optional[float] = None
    error_fit_relu: Optional[float] = None
    error_final: Optional[float] = None
    error_final_relu: Optional[float] = None
    stages: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=dict)
    samples: List[int] = dataclasses.field(default_factory=list)
    spectrum_kept: Optional[float] = None
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.macs_before / self.macs_after if self.macs_after else float("inf")


@dataclasses.dataclass
class DecomposeReport:
    """What a decomposition did (see the module docstring).

    Attributes:
        net, model, weights: the net's name, prototxt and weights.
        method: the method; policy: the DecomposePolicy as plain values.
        layers: every decomposed convolution, in net order.
        macs_before, macs_after: conv+FC multiply-accumulates per image of the whole net.
        params_before, params_after: learnable parameters.
        budget: for --speedup: the target and planned MACs.
        pruning: 3C's channel pruning (slim.prune's report, condensed): kept outputs per layer and its least-squares
            reconstruction errors; empty when nothing was pruned.
        outputs: per net output blob, its held-out relative error against the original net (and, for a 2-D output,
            the fraction of images whose arg-max agrees).
        calibration: the calibration settings and images used (empty without data).
        seconds: where the time went.
        warnings: what the user should know before using the net.
    """

    net: str
    model: str
    weights: str
    method: str
    policy: Dict[str, object]
    layers: List[LayerDecomposition]
    macs_before: float
    macs_after: float
    params_before: int
    params_after: int
    budget: Dict[str, object] = dataclasses.field(default_factory=dict)
    pruning: Dict[str, object] = dataclasses.field(default_factory=dict)
    outputs: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=dict)
    calibration: Dict[str, object] = dataclasses.field(default_factory=dict)
    seconds: Dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: List[str] = dataclasses.field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.macs_before / self.macs_after if self.macs_after else float("inf")

    def to_dict(self) -> Dict[str, object]:
        out = {"format": _FORMAT, "version": _VERSION}
        out.update(dataclasses.asdict(self))
        out["speedup"] = self.speedup
        return out

    def write(self, path: Union[str, Path]) -> None:
        """Write the report as JSON (atomically)."""
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    def __str__(self) -> str:
        def si(v: float) -> str:
            for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
                if abs(v) >= scale:
                    return f"{v / scale:.3g}{unit}"
            return f"{v:.0f}"

        def err(v: Optional[float]) -> str:
            return "-" if v is None else f"{v:.4f}"

        lines = [f"decomposed {self.net or '(unnamed)'} by {self.method} ({len(self.layers)} layers): conv+FC MACs "
                 f"per image {self.macs_before:,.0f} -> {self.macs_after:,.0f} ({self.speedup:.2f}x); learnable "
                 f"params {self.params_before:,} -> {self.params_after:,}"]
        if any(r.error_fit is not None for r in self.layers):
            lines.append("  errors ||Y - Y_hat|| / ||Y|| on held-out calibration samples, after the ReLU where one "
                         "follows: data-free SVD, data-driven fit, written net")
        lines.append(f"  {'layer':<16} {'d':>5} {'d_':>5} {'outputs':>10} {'MACs':>15} {'svd':>7} {'fit':>7} "
                     f"{'final':>7}  layers")
        for r in self.layers:
            outs = f"{r.outputs}" if r.kept_outputs is None else f"{r.outputs}->{r.kept_outputs}"
            pick = (lambda a, b: b if r.relu and b is not None else a)
            lines.append(f"  {r.layer:<16} {r.rank:>5} {'' if r.channel_rank is None else r.channel_rank:>5} "
                         f"{outs:>10} {si(r.macs_before) + '->' + si(r.macs_after):>15} "
                         f"{err(pick(r.error_svd, r.error_svd_relu)):>7} {err(pick(r.error_fit, r.error_fit_relu)):>7} "
                         f"{err(pick(r.error_final, r.error_final_relu)):>7}  {', '.join(r.layers)}"
                         f"{' (folded)' if r.folded else ''}")
        for name, o in self.outputs.items():
            extra = f", arg-max agrees on {o['agreement']:.1%}" if o.get("agreement") is not None else ""
            lines.append(f"  output {name}: relative error {o['error']:.4f} on held-out images{extra}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)
