"""Ranks from a MAC budget: which convolutions to split and at what rank, so that their summed cost fits.

The objective is Zhang et al.'s (2016) for choosing ranks across layers: keep the most of each layer's spectrum,
``maximise sum_l log E_l(d_l)`` with ``E_l(d)`` the fraction of the layer's squared singular values that rank d
keeps, under ``sum_l cost_l(d_l) <= budget``. It is solved greedily: every layer starts whole (not decomposed) and
the step taken next is the one that loses the least log-energy per MAC saved, either splitting a whole layer at the
largest rank that is cheaper than it, or lowering a split layer's rank by one. As log E is concave in d, the ratio
of a layer's next step only grows, so the greedy order is the one of the continuous relaxation.

    ranks = greedy_ranks([RankCandidate("conv2_1", energy, cost, original), ...], budget)   # name -> d or None
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["RankCandidate", "greedy_ranks", "energy"]


def energy(singular_values: np.ndarray) -> np.ndarray:
    """Cumulative fraction of the squared spectrum: ``energy[d - 1]`` is what rank d keeps."""
    sq = np.asarray(singular_values, np.float64) ** 2
    total = float(sq.sum())
    if not total > 0:
        return np.ones(len(sq))
    return np.minimum(np.cumsum(sq) / total, 1.0)


@dataclasses.dataclass
class RankCandidate:
    """A layer the budget may split.

    Attributes:
        name: the layer.
        energy: ``energy[d - 1]``, the spectrum kept at rank d (slim.decompose.ranks.energy).
        cost: rank -> MACs per image of the split layer at that rank.
        original: MACs per image of the layer whole.
    """

    name: str
    energy: np.ndarray
    cost: Callable[[int], float]
    original: float


def _loss(e_from: float, e_to: float) -> float:
    if e_to <= 0:
        return math.inf
    return max(0.0, math.log(e_from) - math.log(e_to)) if e_from > 0 else 0.0


def greedy_ranks(candidates: Sequence[RankCandidate], budget: float) -> Dict[str, Optional[int]]:
    """Ranks (None: left whole) bringing the candidates' summed MACs to at most ``budget``, or as close as rank 1
    everywhere gets (the caller compares)."""
    state: Dict[str, Optional[int]] = {c.name: None for c in candidates}
    total = sum(c.original for c in candidates)
    heap: List = []
    by_name = {c.name: c for c in candidates}

    def push(c: RankCandidate) -> None:
        d = state[c.name]
        if d is None:
            cheaper = [r for r in range(len(c.energy), 0, -1) if c.cost(r) < c.original]
            if not cheaper:
                return
            to = cheaper[0]
            saving = c.original - c.cost(to)
            loss = _loss(1.0, float(c.energy[to - 1]))
        else:
            if d <= 1:
                return
            to = d - 1
            saving = c.cost(d) - c.cost(to)
            loss = _loss(float(c.energy[d - 1]), float(c.energy[to - 1]))
        if saving <= 0:
            return
        heapq.heappush(heap, (loss / saving, c.name, to, saving))

    for c in candidates:
        push(c)
    while total > budget and heap:
        _, name, to, saving = heapq.heappop(heap)
        state[name] = to
        total -= saving
        push(by_name[name])
    return state
