"""Where a global ranking was cut, and whether the scores there separate weak channels from strong ones.

Network slimming's premise is a bimodal score distribution after sparse training: a mass of channels whose gamma is
near zero, a gap, and the channels that matter. A global cut belongs in that gap. Pruning a net that was not made
sparse (or cutting far past its near-zero mass) removes channels that score like the ones kept, and nothing in the
counts shows it. So every global cut is recorded with the score distribution it was taken from, and judged:

* **threshold**: the highest score removed by the ranking (every removed channel scored at most this), and the
  lowest score kept among the channels ranked;
* **gap**: how widely the scores of the ranks around the cut are spread, against the average spread per rank
  between the 5th and 95th percentiles. Above 1 the cut lies in a low-density region (a gap: good); below 1 the
  channels on both sides of it score alike. The window is 2.5% of the ranked channels (at least 2) on each side;
* the cut is called *dense* when the gap is below 1, unless the first channel kept is itself negligible (at most
  1% of the 95th percentile: the cut then runs through the near-zero mass, which is safe).

Scores are the ranked ones: |gamma| for ``slimming``, filter norms divided by their layer's scale for ``l1``/``l2``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import numpy as np

__all__ = ["CutStats", "cut_stats"]

#: The percentiles recorded of the ranked scores.
QUANTILES = (0, 1, 5, 10, 25, 50, 75, 90, 95, 99, 100)
#: Scores below which the fraction of channels is recorded (|gamma| after sparse training sits below 1e-2).
LEVELS = (1e-3, 1e-2, 1e-1)
_WINDOW = 0.025
_NEGLIGIBLE = 0.01


@dataclasses.dataclass
class CutStats:
    """One global cut and the distribution of the scores it was taken from (see the module docstring).

    Attributes:
        ranked: how many channels the global ranking held.
        at_or_below: how many of them score at most the threshold (removed, unless a limit kept some).
        threshold: the highest score removed (None when nothing was removed).
        first_kept: the lowest score kept (None when everything was removed).
        gap: the spread of the scores around the cut against the average spread (inf: a step between equal
            scores; None when there is no cut inside the ranking).
        quantiles: percentile -> score.
        below: level -> fraction of the ranked channels scoring below it.
        skipped: ranked channels passed over (kept out of rank order) so that a MAC target lands within tolerance.
    """

    ranked: int
    at_or_below: int
    threshold: Optional[float]
    first_kept: Optional[float]
    gap: Optional[float]
    quantiles: Dict[str, float]
    below: Dict[str, float]
    skipped: int = 0

    @property
    def dense(self) -> bool:
        """Whether the cut lies where the scores are dense (channels removed and kept score alike)."""
        if self.gap is None or self.gap >= 1:
            return False
        return not (self.first_kept is not None and self.first_kept <= _NEGLIGIBLE * self.quantiles["95"])

    def to_dict(self) -> Dict[str, object]:
        out = dataclasses.asdict(self)
        out["gap"] = None if self.gap is None or math.isinf(self.gap) else self.gap
        out["dense"] = self.dense
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "CutStats":
        """The CutStats that ``to_dict`` wrote (a step's infinite gap reads back as None)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def describe(self) -> str:
        """One line: the threshold, the distribution, the gap."""
        q = self.quantiles
        parts = [f"cut at score {self.threshold:.4g} (first kept {_g(self.first_kept)})" if self.threshold is not None
                 else "no channel cut by the ranking"]
        if self.gap is not None:
            parts.append(f"gap {self.gap:.2f}x the average spread" if math.isfinite(self.gap) else "gap: a step")
        if self.skipped:
            parts.append(f"{self.skipped} ranked channel{'s' if self.skipped != 1 else ''} kept out of order to land "
                         f"on the MAC target")
        parts.append(f"scores min {q['0']:.3g}, 5% {q['5']:.3g}, median {q['50']:.3g}, 95% {q['95']:.3g}, "
                     f"max {q['100']:.3g}; " + ", ".join(f"{100 * v:.2f}% below {k}" for k, v in self.below.items()))
        return "; ".join(parts)

    def warning(self, criterion: str) -> Optional[str]:
        """The warning a dense cut deserves, or None."""
        if not self.dense:
            return None
        below = self.below[_key(1e-2)]
        advice = ("Prune less, or train with the sparsity penalty (longer, or a larger penalty) until a mass of "
                  "gammas sits near 0." if criterion == "slimming" else
                  "Prune less: this criterion does not separate weak channels from strong ones here.")
        sparse = "" if below >= 0.05 else ": the net does not look sparse"
        return (f"the cut at score {self.threshold:.4g} lies where the scores are dense (gap {self.gap:.2f}x the "
                f"average spread): the channels removed score like those kept ({100 * below:.2f}% of the "
                f"{self.ranked} ranked scores are below 1e-2{sparse}). {advice}")


def _g(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def _key(level: float) -> str:
    return f"{level:g}"


def cut_stats(scores: np.ndarray, threshold: Optional[float]) -> CutStats:
    """The statistics of a cut through ``scores`` (the ranked channels' scores, NaN-free) at ``threshold``.

    Args:
        scores: the score of every channel the ranking held.
        threshold: the highest score removed, None when none was.
    """
    s = np.sort(np.asarray(scores, np.float64))
    n = len(s)
    quantiles = {str(q): float(np.percentile(s, q)) if n else 0.0 for q in QUANTILES}
    below = {_key(level): float((s < level).mean()) if n else 0.0 for level in LEVELS}
    k = int(np.searchsorted(s, threshold, side="right")) if threshold is not None else 0
    first_kept = float(s[k]) if k < n else None
    gap = None
    if 0 < k < n:
        w = max(2, math.ceil(_WINDOW * n))
        lo, hi = max(0, k - w), min(n - 1, k + w - 1)
        local = (s[hi] - s[lo]) / max(1, hi - lo)
        average = (quantiles["95"] - quantiles["5"]) / (0.9 * max(1, n - 1))
        gap = local / average if average > 0 else (math.inf if local > 0 else 0.0)
    return CutStats(n, k, threshold, first_kept, gap, quantiles, below)
