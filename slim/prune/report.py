"""The pruning report: per pruned layer, channels before and after and the kept indices; totals; the policy.

Written as JSON next to the pruned net (``OUT.json``), it is also a recipe: ``slim prune --apply-report R`` replays
the same pruning on a fresh copy of the same net (the kept output channels of every Convolution, Deconvolution and
InnerProduct fix every group). Reading it parses JSON only; nothing in it is executed.

Example (``print(report)``: VGG-19 for CIFAR-10 with uniformly random gammas, ``--percent 0.7``)::

    pruned VGG19_CIFAR10 (criterion slimming, tie rule union): removed 3852 of the 5504 prunable channels (69.99%;
    asked 3852)
      a channel is one keep-or-remove decision (channels tied across layers count once)
      conv+FC MACs per image 398,136,320 -> 39,137,186 (10.17x); learnable params 20,035,018 -> 1,774,012 (11.29x)
      layer                    type           channels
      conv1_1                  Convolution    64 -> 18
      ...
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional, Union

from slim.errors import PruneError
from slim.io.atomic import atomic_write
from slim.prune.cut import CutStats

__all__ = ["LayerChange", "PruneReport"]

_FORMAT = "slim-prune-report"
_VERSION = 1


@dataclasses.dataclass
class LayerChange:
    """One producer layer: output channels before and after, and which were kept (indices into the original)."""

    name: str
    type: str
    before: int
    after: int
    kept: List[int]


@dataclasses.dataclass
class PruneReport:
    """What a pruning did (see the module docstring).

    Attributes:
        net: the net's name.
        model: the prototxt it came from.
        weights: the weights it came from.
        criterion: the importance criterion (None for a replay).
        tie_rule: how tied members combined (None for a replay).
        policy: the PrunePolicy as plain values (empty for a replay).
        prunable: N, the channels that could be removed. A channel is one keep-or-remove decision: channels tied
            across layers (by a residual sum, a Concat repeating them) count once. Every count here is of these.
        requested: channels the policy asked for (``floor(N * p)`` for a global ``--percent p``; None for a replay).
        removed: channels removed.
        channels_before, channels_after: layer widths, the output channels summed over the producer layers (a
            channel tied across k producers counts k times here; not the count above).
        params_before, params_after: learnable parameters (BatchNorm statistics excluded).
        macs_before, macs_after: conv+FC multiply-accumulates per image.
        folded: removed-channel constants folded into a bias; dropped: those that could not be (--absorb-bias).
        biased: layers that were given a bias to hold folded constants.
        layers: every producer layer, pruned or not, in net order.
        cut: the global ranking's cut and score distribution (slim.prune.cut.CutStats.to_dict; empty when the policy
            had no global ranking): threshold, first_kept, gap, dense, quantiles, below.
        warnings: what the user should know before using the pruned net (a cut through dense scores, ...).
        reconstruction: for ``--criterion lasso`` (slim.prune.reconstruct): "layers" (per refitted layer: input
            channels before and after, relative errors ||Y - Y_hat|| / ||Y|| on held-out calibration samples with
            the original weights on all inputs, on the kept inputs, and after the least squares), "selections" (per
            pruned group), "pinned" (layers lasso kept whole, and why), "calibration" and "seconds"; else empty.
    """

    net: str
    model: str
    weights: str
    criterion: Optional[str]
    tie_rule: Optional[str]
    policy: Dict[str, object]
    prunable: int
    requested: Optional[int]
    removed: int
    channels_before: int
    channels_after: int
    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    folded: int
    dropped: int
    biased: List[str]
    layers: List[LayerChange]
    cut: Dict[str, object] = dataclasses.field(default_factory=dict)
    warnings: List[str] = dataclasses.field(default_factory=list)
    reconstruction: Dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """The fraction of the prunable channels actually removed."""
        return self.removed / self.prunable if self.prunable else 0.0

    @property
    def kept(self) -> Dict[str, List[int]]:
        """Producer layer -> kept output channel indices (what --apply-report replays)."""
        return {c.name: c.kept for c in self.layers}

    @property
    def pruned_layers(self) -> List[LayerChange]:
        return [c for c in self.layers if c.after < c.before]

    def to_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {"format": _FORMAT, "version": _VERSION}
        # Field by field (dataclasses.asdict deep-copies every kept index, slow for a big net).
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layers"})
        out["policy"] = dict(self.policy)
        out["biased"] = list(self.biased)
        out["cut"] = dict(self.cut)
        out["warnings"] = list(self.warnings)
        out["reconstruction"] = dict(self.reconstruction)
        out["fraction"] = self.fraction
        out["layers"] = [{"name": c.name, "type": c.type, "before": c.before, "after": c.after, "kept": c.kept}
                         for c in self.layers]
        return out

    def to_json(self) -> str:
        """Indented JSON, with each kept-index list on one line."""
        data = self.to_dict()
        layers = data.pop("layers")
        text = json.dumps(data, indent=2)
        rows = ",\n".join("    " + json.dumps(layer) for layer in layers)
        return text[:-2] + ',\n  "layers": [\n' + rows + "\n  ]\n}\n"

    def write(self, path: Union[str, Path]) -> None:
        """Write the JSON report atomically."""
        with atomic_write(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def from_dict(cls, data: Dict[str, object], source: str = "<report>") -> "PruneReport":
        """Rebuild a report from its JSON values; a PruneError names what is missing or malformed."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise PruneError(f"{source} is not a slim prune report (no \"format\": \"{_FORMAT}\"); pass the .json that "
                             f"slim prune wrote next to the pruned net.")
        if data.get("version") != _VERSION:
            raise PruneError(f"{source} is a version {data.get('version')} prune report; this slim reads version "
                             f"{_VERSION}.")
        try:
            layers = [LayerChange(str(l["name"]), str(l["type"]), int(l["before"]), int(l["after"]),
                                  [int(i) for i in l["kept"]]) for l in data["layers"]]
            fields = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name != "layers"
                      and (f.name in data or f.default_factory is dataclasses.MISSING)}   # older reports lack some
        except (KeyError, TypeError, ValueError) as e:
            raise PruneError(f"{source} is a damaged prune report ({type(e).__name__}: {e}); regenerate it with "
                             f"slim prune.") from None
        for change in layers:
            if len(change.kept) != change.after:
                raise PruneError(f"{source}: layer {change.name!r} lists {len(change.kept)} kept channels but says it "
                                 f"keeps {change.after}; the report is damaged.")
        return cls(layers=layers, **fields)

    @classmethod
    def read(cls, path: Union[str, Path]) -> "PruneReport":
        """Read a JSON report written by ``write``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PruneError(f"Prune report {path} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PruneError(f"{path} is not valid JSON ({e}); pass the report slim prune wrote.") from None
        return cls.from_dict(data, str(path))

    def __str__(self) -> str:
        how = f"criterion {self.criterion}, tie rule {self.tie_rule}" if self.criterion else "replayed report"
        req = f"; asked {self.requested}" if self.requested is not None else ""
        ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"
        lines = [f"pruned {self.net or '(unnamed)'} ({how}): removed {self.removed} of the {self.prunable} prunable "
                 f"channels ({self.fraction:.2%}{req})",
                 "  a channel is one keep-or-remove decision (channels tied across layers count once)",
                 f"  conv+FC MACs per image {self.macs_before:,.0f} -> {self.macs_after:,.0f} "
                 f"({ratio(self.macs_before, self.macs_after)}); learnable params {self.params_before:,} -> "
                 f"{self.params_after:,} ({ratio(self.params_before, self.params_after)})"]
        target = self.policy.get("target_macs") or (self.macs_before / self.policy["speedup"]
                                                    if self.policy.get("speedup") else None)
        if target:
            lines.append(f"  target {target:,.0f} MACs per image ({ratio(self.macs_before, target)}); reached "
                         f"{self.macs_after:,.0f} ({ratio(self.macs_before, self.macs_after)}, "
                         f"{100 * (self.macs_after / target - 1):+.2f}% of the target)")
        if self.requested is not None and self.removed < self.requested:
            lines.append(f"  note: {self.requested} channels were asked for; --min-channels, --max-prune-per-layer, "
                         f"--round-to and non-empty blobs kept {self.requested - self.removed} of them")
        if self.cut:
            lines.append(f"  {CutStats.from_dict(self.cut).describe()}")
        for warning in self.warnings:
            lines.append(f"  WARNING: {warning}")
        if self.folded or self.dropped:
            lines.append(f"  folded {self.folded} removed-channel constants into biases"
                         + (f"; {self.dropped} could not be folded (read through padding)" if self.dropped else ""))
        pruned = self.pruned_layers
        if pruned:
            width = max(24, max(len(c.name) for c in pruned) + 2)
            lines.append(f"  {'layer':<{width}} {'type':<14} channels")
            for c in pruned:
                lines.append(f"  {c.name:<{width}} {c.type:<14} {c.before} -> {c.after}")
        lines.extend(self._reconstruction_lines())
        return "\n".join(lines)

    def _reconstruction_lines(self) -> List[str]:
        rec = self.reconstruction
        if not rec or not rec.get("layers"):
            return []
        cal = rec.get("calibration", {})
        lines = [f"  least-squares reconstruction on {cal.get('images_fit', '?')} calibration images "
                 f"({cal.get('source', '?')}); relative error ||Y - Y_hat|| / ||Y|| on "
                 f"{cal.get('images_held_out', '?')} held-out images:",
                 f"  {'layer':<24} {'inputs':>11} {'unpruned':>9} {'pruned':>9} {'refitted':>9}"]
        for r in rec["layers"]:
            lines.append(f"  {r['layer']:<24} {r['inputs_before']:>5} -> {r['inputs_after']:<4}"
                         f"{r['error_unpruned']:>9.4f} {r['error_pruned']:>9.4f} {r['error_reconstructed']:>9.4f}"
                         + ("" if r.get("refitted", True) else "  (sliced, not refitted)"))
        for layer, why in rec.get("pinned", {}).items():
            lines.append(f"  kept whole: {layer}: {why}")
        return lines
