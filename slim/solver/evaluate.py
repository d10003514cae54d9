"""Testing a net: forward passes, every element of every output blob averaged (Caffe's ``Solver::Test`` and
``caffe test``).

    ev = evaluate(net, iterations=100)
    for score in ev.scores:
        print(score)                        # "accuracy = 0.9312", "loss = 0.25 (* 1 = 0.25 loss)"

Outputs are the net's output blobs in Caffe's order (unconsumed tops, alphabetical); a blob of several elements
gives one score per element, numbered on, as Caffe's ``Test net output #k``. Means are accumulated in float64.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Optional

import torch

from slim.solver.logs import fmt

__all__ = ["Score", "Evaluation", "evaluate", "output_scores", "output_loss_weights"]


@dataclasses.dataclass(frozen=True)
class Score:
    """One element of an output blob.

    Attributes:
        name: the output blob.
        value: its value (a mean, for a test).
        loss_weight: the blob's loss weight (0 for non-loss outputs such as accuracy).
    """

    name: str
    value: float
    loss_weight: float = 0.0

    def __str__(self) -> str:
        # Caffe: "name = v" plus " (* w = w*v loss)" for loss outputs.
        extra = f" (* {fmt(self.loss_weight)} = {fmt(self.loss_weight * self.value)} loss)" if self.loss_weight else ""
        return f"{self.name} = {fmt(self.value)}{extra}"


@dataclasses.dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes:
        iterations: forward passes run.
        scores: the mean of every output element, in output order.
        loss: the mean of the net's weighted loss (0.0 for a net without loss).
    """

    iterations: int
    scores: list[Score]
    loss: float

    def as_dict(self) -> dict:
        """Output blob -> mean (a list for blobs of several elements)."""
        out: dict = {}
        for s in self.scores:
            if s.name in out:
                prev = out[s.name]
                out[s.name] = (prev if isinstance(prev, list) else [prev]) + [s.value]
            else:
                out[s.name] = s.value
        return out


def output_loss_weights(net) -> dict[str, float]:
    """Output blob name -> the loss weight of the top that produces it."""
    graph = net.graph
    weights = {}
    for name, blob_id in zip(graph.outputs, graph.output_ids):
        layer, top = graph.producer[blob_id]
        lw = graph.layers[layer].loss_weights
        weights[name] = float(lw[top]) if top < len(lw) else 0.0
    return weights


def output_scores(outputs, loss_weights: dict[str, float]) -> list[Score]:
    """Every element of every output blob of one forward pass, as scores."""
    scores = []
    for name, value in outputs.items():
        flat = value.detach().reshape(-1).to("cpu", torch.float64).tolist()
        w = loss_weights.get(name, 0.0)
        scores.extend(Score(name, v, w) for v in flat)
    return scores


def evaluate(net, iterations: int, *, on_batch: Optional[Callable[[int, list[Score]], None]] = None,
             autocast: Optional[Callable[[], ContextManager]] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> Optional[Evaluation]:
    """Run ``iterations`` forward passes of a net that reads its own data and average its outputs.

    Args:
        net: a slim Net (TEST phase, usually).
        iterations: forward passes.
        on_batch: called after each pass with its index and scores (``caffe test`` logs them).
        autocast: a context-manager factory wrapping each forward (mixed precision).
        should_stop: polled after each pass; when it returns True the test is abandoned.

    Returns:
        The averages, or None when ``should_stop`` abandoned the test.
    """
    weights = output_loss_weights(net)
    sums: Optional[list[float]] = None
    first: list[Score] = []
    loss = 0.0
    autocast = autocast or contextlib.nullcontext
    with torch.no_grad():
        for i in range(iterations):
            with autocast():
                out = net()
            scores = output_scores(out, weights)
            if out.loss is not None:
                loss += float(out.loss)
            if sums is None:
                sums, first = [s.value for s in scores], scores
            else:
                for k, s in enumerate(scores):
                    sums[k] += s.value
            if on_batch is not None:
                on_batch(i, scores)
            if should_stop is not None and should_stop():
                return None
    means = [dataclasses.replace(s, value=total / iterations) for s, total in zip(first, sums or [])]
    return Evaluation(iterations, means, loss / iterations if iterations else 0.0)
