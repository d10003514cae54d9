"""Network slimming's sparsity penalty (Liu et al., "Learning Efficient Convolutional Networks through Network
Slimming", ICCV 2017) and statistics of the channel scaling factors it drives to zero.

The penalty is ``penalty * sum |gamma|`` over the targeted scaling factors. Its subgradient
``penalty * sign(gamma)`` is added to each gamma's gradient after backward -- after the gradient all-reduce
with several processes and after unscaling with mixed precision -- and before the update rule, so it goes
through momentum like the rest of the gradient (the paper's code does ``grad.add_(s * sign(w))`` and then
``optimizer.step()``).

In Caffe's ``ApplyUpdate`` order it runs as a gradient hook of :meth:`UpdateRule.apply_update`: after the
``1/iter_size`` normalisation, so accumulating gradients over ``iter_size`` passes does not dilute it, and
after weight decay; clipping (``clip_gradients``) sees the data gradient only, as it does not see weight decay.

With ``penalty: 0`` the hook returns at once: the trajectory is bit for bit that of plain Caffe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slim import proto as pb
from slim.errors import SolverError
from slim.solver.rules import LearnableParamLike

__all__ = ["SparsityPenalty", "create_sparsity", "GammaStats", "gamma_stats"]


class SparsityPenalty:
    """Adds ``penalty * sign(gamma)`` to the gradient of each target; a gradient hook for ``apply_update``.

    Example::

        penalty = create_sparsity(solver, net.learnable_params, net.scaling_factors(), "solver.prototxt")
        rule.apply_update(schedule.rate(it), it, gradient_hooks=[penalty])
        print(penalty.stats())      # gamma: 5504 channels, 41.20% < 1e-2, ...

    Attributes:
        penalty: the paper's s (lambda), as a float32 value; 0 disables the hook.
        targets: layer name -> scaling-factor tensor (a leaf whose ``.grad`` receives the term).
    """

    def __init__(self, penalty: float, targets: Mapping[str, torch.Tensor]) -> None:
        self.penalty = float(np.float32(penalty))
        self.targets = dict(targets)
        self._tensors = list(self.targets.values())
        self._ids = {id(t) for t in self._tensors}

    def __call__(self, tensors: Sequence[torch.Tensor] | None = None) -> None:
        """Add the penalty's subgradient to the targets' gradients (nothing at all when penalty is 0).

        Args:
            tensors: restrict to the targets among these (``apply_update`` passes one chunk of params at a
                time); None means every target.
        """
        if self.penalty == 0 or not self._ids:
            return
        if tensors is None:
            tensors = self._tensors
        else:
            tensors = [t for t in tensors if id(t) in self._ids]
            if not tensors:
                return
        with torch.no_grad():
            grads = []
            for t in tensors:
                if t.grad is None:
                    t.grad = torch.zeros_like(t)
                grads.append(t.grad)
            torch._foreach_add_(grads, torch._foreach_sign(tensors), alpha=self.penalty)

    def stats(self) -> "GammaStats":
        """Statistics of the targets' current values (see :func:`gamma_stats`)."""
        return gamma_stats(self._tensors)

    def __repr__(self) -> str:
        names = list(self.targets)
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} layers)" if len(names) > 4 else "")
        return f"SparsityPenalty(penalty={self.penalty:g}, targets=[{shown}])"


def create_sparsity(solver: pb.SolverParameter, params: Sequence[LearnableParamLike],
                    default_targets: Mapping[str, torch.Tensor], source: str = "the solver") -> SparsityPenalty:
    """Build the penalty of ``solver.sparsity``.

    Targets are the first blob of each layer named in ``sparsity.layer``, or, when none is named, the net's
    default scaling factors (every Scale layer that follows a BatchNorm, as the net builder reports them).
    Targets are resolved even with penalty 0, so a misspelt name fails early and :meth:`SparsityPenalty.stats`
    can follow the gammas during fine-tuning.

    Args:
        solver: the solver definition (``sparsity.penalty``, ``sparsity.layer``).
        params: the train net's learnable params (``.layer``, ``.index``, ``.tensor``).
        default_targets: layer name -> scaling-factor tensor, used when ``sparsity.layer`` is empty.
        source: the solver's file name, used in error messages.

    Raises:
        SolverError: a negative penalty, a named layer without learnable blobs, a default target that is
            not a learnable param, or a penalty with nothing to apply it to.
    """
    penalty = solver.sparsity.penalty
    if not math.isfinite(penalty) or penalty < 0:
        raise SolverError(f"{source}: sparsity.penalty must be a finite number >= 0, but it is {penalty:g}. "
                          f"Set sparsity {{ penalty: 1e-4 }} (VGG) or 1e-5 (ResNet, DenseNet), or 0 to disable it.")
    first_blob = {p.layer: p.tensor for p in params if p.index == 0}
    targets: dict[str, torch.Tensor] = {}
    if solver.sparsity.layer:
        for name in solver.sparsity.layer:
            if name not in first_blob:
                known = list(first_blob)
                listed = ", ".join(known[:12]) + (f", ... ({len(known)} in all)" if len(known) > 12 else "")
                raise SolverError(f"{source}: sparsity.layer \"{name}\" is not a layer with learnable blobs in "
                                  f"the train net (those are: {listed or 'none'}). Fix the name in "
                                  f"sparsity {{ layer: ... }}.")
            targets[name] = first_blob[name]
    else:
        learnable = {id(p.tensor) for p in params}
        for name, tensor in default_targets.items():
            if id(tensor) not in learnable:
                raise SolverError(f"{source}: the scaling factor of layer \"{name}\" is not among the train net's "
                                  f"learnable params, so a sparsity penalty on it would never reach the update. "
                                  f"Name the penalised layers with sparsity {{ layer: ... }}.")
            targets[name] = tensor
        if penalty > 0 and not targets:
            raise SolverError(f"{source}: sparsity.penalty is {penalty:g} but the net has no channel scaling "
                              f"factors (no Scale layer follows a BatchNorm). Name the layers to penalise with "
                              f"sparsity {{ layer: \"...\" }}, or set penalty: 0.")
    return SparsityPenalty(penalty, targets)


@dataclass(frozen=True)
class GammaStats:
    """How far the scaling factors are from zero: what decides a pruning threshold.

    Attributes:
        count: number of scaling factors (channels).
        below_1e2: fraction with ``|gamma| < 1e-2``.
        below_1e3: fraction with ``|gamma| < 1e-3``.
        min_abs: smallest ``|gamma|``.
        median_abs: median ``|gamma|`` (the mean of the two middle values for an even count).
    """

    count: int
    below_1e2: float
    below_1e3: float
    min_abs: float
    median_abs: float

    def __str__(self) -> str:
        if self.count == 0:
            return "gamma: no scaling factors"
        return (f"gamma: {self.count} channels, {100 * self.below_1e2:.2f}% < 1e-2, {100 * self.below_1e3:.2f}% "
                f"< 1e-3, min |gamma| {self.min_abs:.3g}, median |gamma| {self.median_abs:.4g}")


def gamma_stats(tensors: Iterable[torch.Tensor] | Mapping[str, torch.Tensor]) -> GammaStats:
    """Statistics of ``|gamma|`` over all elements of the given tensors (or of a mapping's values).

    Args:
        tensors: scaling-factor tensors, on any device.

    Returns:
        A :class:`GammaStats`; with no elements, count 0 and NaN elsewhere.
    """
    if isinstance(tensors, Mapping):
        tensors = tensors.values()
    flat = [t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors]
    values = torch.cat(flat).abs().numpy() if flat else np.zeros(0)
    if values.size == 0:
        return GammaStats(0, math.nan, math.nan, math.nan, math.nan)
    return GammaStats(count=int(values.size), below_1e2=float(np.mean(values < 1e-2)),
                      below_1e3=float(np.mean(values < 1e-3)), min_abs=float(values.min()),
                      median_abs=float(np.median(values)))
