"""Caffe's update rules (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam) and ``ApplyUpdate``'s order.

One update, as ``SGDSolver::ApplyUpdate`` does it (REFERENCE §2.1 step 8), on gradients already summed over
``iter_size`` passes (and averaged over processes)::

    clip       if clip_gradients >= 0 and ||g_all||_2 > clip_gradients: every g *= clip_gradients / ||g_all||_2
    per param  g *= 1 / iter_size                              (Normalize)
               g += local_decay * w        (L2)                (Regularize; local_decay = weight_decay * decay_mult)
               g += local_decay * sign(w)  (L1)
               gradient hooks: the sparsity penalty            (slim's addition, see slim.solver.sparsity)
               diff = rule(g, history, local_rate)             (ComputeUpdateValue; local_rate = rate * lr_mult)
               w -= diff                                       (Net::Update)

Where Caffe differs from ``torch.optim`` -- and slim follows Caffe:

* SGD keeps the learning rate **inside** its history: ``h = momentum * h + local_rate * g; w -= h``.
  ``torch.optim.SGD`` keeps ``b = momentum * b + g; w -= lr * b``. The two agree while the rate is constant
  (``h = lr * b``) and differ at every rate change: Caffe's history still carries the old rate, so a step
  down takes effect gradually, where torch rescales the whole velocity at once. Nesterov likewise.
* Weight decay is added to the gradient before the rule (coupled L2, as torch's ``weight_decay``, not AdamW),
  after the ``1/iter_size`` normalisation; clipping sees the summed, un-normalised data gradient only.
* Adam adds ``delta`` to ``sqrt(v)`` before the bias correction, which is applied to the step size.
* Parameters that got no gradient are updated as if their gradient were zero (Caffe zeroes every diff), so
  weight decay and momentum still move them; ``torch.optim`` skips them.

Speed: the steps run as ``torch._foreach_*`` calls over chunks of params (on the CPU, chunks small enough to
stay in cache through all steps), which measured as fast as ``torch.optim.SGD`` on VGG-19 and twice as fast on
ResNet-56's many small tensors.

Scalars are rounded to float32 where Caffe holds them in ``Dtype`` (the rate, ``local_rate``,
``local_decay``, ``1/iter_size``, ``1 - momentum``, Adam's correction), so a float32 net follows Caffe's
arithmetic up to the order of floating-point operations inside the kernels.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable, ClassVar, Protocol, Sequence

import numpy as np
import torch

from slim import proto as pb
from slim.errors import SolverError

__all__ = ["RULES", "LearnableParamLike", "UpdateRule", "SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam",
           "register_rule", "create_rule"]

_log = logging.getLogger(__name__)

RULES: dict[str, type["UpdateRule"]] = {}

GradientHook = Callable[[Sequence[torch.Tensor]], None]


class LearnableParamLike(Protocol):
    """What a rule needs of a learnable parameter (the net builder's ``LearnableParam`` provides it).

    Attributes:
        layer: name of the layer that owns the blob.
        index: the blob's position in that layer's Caffe blobs.
        tensor: a leaf tensor; its ``.grad`` holds the gradient summed over the ``iter_size`` passes.
        lr_mult: the blob's ``ParamSpec.lr_mult``.
        decay_mult: the blob's ``ParamSpec.decay_mult``.
    """

    layer: str
    index: int
    tensor: torch.Tensor
    lr_mult: float
    decay_mult: float


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float (Caffe's ``Dtype`` cast)."""
    return float(np.float32(x))


def register_rule(name: str) -> Callable[[type["UpdateRule"]], type["UpdateRule"]]:
    """Class decorator: register an :class:`UpdateRule` under Caffe's (case-sensitive) ``type`` string."""

    def deco(cls: type[UpdateRule]) -> type[UpdateRule]:
        assert name not in RULES, f"update rule {name} registered twice"
        cls.type = name
        RULES[name] = cls
        return cls

    return deco


# Params are updated in chunks of about this many elements on the CPU: every step of ApplyUpdate for one chunk
# runs while the chunk is still in cache (one foreach call per step and chunk keeps the per-tensor overhead low).
# Elsewhere one chunk per (lr_mult, decay_mult): the multi-tensor kernels of the GPU prefer few, long lists.
_CPU_CHUNK_NUMEL = 1 << 18


class _Chunk:
    """Consecutive params sharing (lr_mult, decay_mult), so one foreach call with one scalar serves them all."""

    def __init__(self, lr_mult: float, decay_mult: float) -> None:
        self.lr_mult = lr_mult
        self.decay_mult = decay_mult
        self.indices: list[int] = []
        self.tensors: list[torch.Tensor] = []
        self.numel = 0
        self.history: list[list[torch.Tensor]] = []  # one list per history kind (1 or 2)


class UpdateRule:
    """Base of the update rules: Caffe's ``ApplyUpdate`` with the rule-specific ``ComputeUpdateValue``.

    A subclass sets :attr:`history_per_param` (1, or 2 for AdaDelta and Adam) and implements
    :meth:`_compute` for one chunk of parameters sharing ``local_rate``. It may overwrite the gradients it is
    given; it returns the tensors to subtract from the weights.

    Attributes:
        params: the learnable params, in Caffe's ``learnable_params`` order.
        history: the update history, as ``SolverState.history``: N tensors (one per param, in order), or 2N
            (all first-kind tensors, then all second-kind ones) for AdaDelta and Adam. All start at 0.
        momentum, weight_decay, regularization_type, iter_size, clip_gradients, delta: the solver's fields.

    Args:
        solver: the solver definition.
        params: the learnable params (see :class:`LearnableParamLike`), all leaf tensors.
        source: the solver's file name, used in error messages.
    """

    type: ClassVar[str] = ""
    history_per_param: ClassVar[int] = 1
    # Leave each param's step in its .grad after the update, as Caffe's ComputeUpdateValue leaves it in the diff
    # (the pycaffe facade sets it, so ``param.diff`` after a step is what Caffe shows); else .grad is scratch.
    keep_steps: bool = False

    def __init__(self, solver: pb.SolverParameter, params: Sequence[LearnableParamLike],
                 source: str = "the solver") -> None:
        self.source = source
        self.params = list(params)
        self.momentum = solver.momentum
        self.weight_decay = solver.weight_decay
        self.regularization_type = solver.regularization_type
        self.iter_size = solver.iter_size
        self.clip_gradients = solver.clip_gradients
        self.delta = solver.delta
        if self.regularization_type not in ("L1", "L2"):
            # Caffe reads the type only in Regularize, for a param whose local decay is non-zero: a solver with no
            # weight decay runs whatever the string says.
            decayed = [p for p in self.params if _f32(self.weight_decay * p.decay_mult) != 0]
            if decayed:
                self._fail(f"regularization_type \"{self.regularization_type}\" is unknown; Caffe knows \"L2\" "
                           f"(the default) and \"L1\" (case-sensitive). Fix regularization_type.")
            warnings.warn(f"{self.source}: regularization_type \"{self.regularization_type}\" is unknown, but no "
                          f"param is decayed (weight_decay {self.weight_decay:g}), so it is never read, as in "
                          f"Caffe. Caffe knows \"L2\" and \"L1\".", UserWarning, stacklevel=3)
        if self.iter_size < 1:
            self._fail(f"iter_size must be at least 1, but it is {self.iter_size}. Set iter_size to the number "
                       f"of forward/backward passes whose gradients are accumulated per update.")
        self._check(solver)
        with torch.no_grad():
            # zeros_like keeps the param's memory format (channels_last stays channels_last).
            self.history = [torch.zeros_like(p.tensor) for _ in range(self.history_per_param) for p in self.params]
        self._chunks = self._make_chunks()

    def _make_chunks(self) -> list[_Chunk]:
        open_chunks: dict[tuple[float, float], _Chunk] = {}
        chunks = []
        for i, p in enumerate(self.params):
            key = (float(p.lr_mult), float(p.decay_mult))
            chunk = open_chunks.get(key)
            if chunk is None:
                chunk = open_chunks[key] = _Chunk(*key)
                chunks.append(chunk)
            chunk.indices.append(i)
            chunk.tensors.append(p.tensor)
            chunk.numel += p.tensor.numel()
            if p.tensor.device.type == "cpu" and chunk.numel >= _CPU_CHUNK_NUMEL:
                del open_chunks[key]
        n = len(self.params)
        for c in chunks:
            c.history = [[self.history[k * n + i] for i in c.indices] for k in range(self.history_per_param)]
        return chunks

    def _fail(self, what: str) -> None:
        raise SolverError(f"{self.source}: {what}")

    def _check(self, solver: pb.SolverParameter) -> None:
        """Rule-specific constraints (Caffe's CHECKs); raise SolverError."""

    def _history_name(self, k: int) -> str:
        n = len(self.params)
        p = self.params[k % n]
        kind = "" if self.history_per_param == 1 else (" (first history)" if k < n else " (second history)")
        return f"{p.layer}[{p.index}]{kind}"

    def load_history(self, blobs: Sequence[np.ndarray | torch.Tensor]) -> None:
        """Restore the history from a snapshot (``SolverState.history``), in place.

        A shape matches when it is equal to the param's, or equal once leading 1s are dropped from both (the
        legacy num/channels/height/width form of old snapshots).

        Args:
            blobs: N or 2N arrays (see :attr:`history`), in order.

        Raises:
            SolverError: the count or a shape does not match the net.
        """
        if len(blobs) != len(self.history):
            per = "one per learnable param" if self.history_per_param == 1 else "two per learnable param"
            self._fail(f"a snapshot whose history does not match the net: the {self.type} rule keeps "
                       f"{len(self.history)} history blobs ({per}, {len(self.params)} params), but the snapshot "
                       f"has {len(blobs)}. Resume with the net and solver type the snapshot was taken with.")
        for k, (h, b) in enumerate(zip(self.history, blobs)):  # every shape, before anything is copied
            shape = tuple(np.shape(b))
            if shape != tuple(h.shape) and _strip(shape) != _strip(h.shape):
                self._fail(f"a snapshot whose history does not match the net: history blob {k} belongs to "
                           f"{self._history_name(k)} of shape {tuple(h.shape)}, but the snapshot's has shape "
                           f"{shape}. Resume with the net the snapshot was taken with.")
        with torch.no_grad():
            for h, b in zip(self.history, blobs):
                t = b.detach() if isinstance(b, torch.Tensor) else torch.tensor(np.asarray(b))
                h.copy_(t.reshape(h.shape))

    def _grads(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        # Caffe zeroes every diff before the passes, so a param that got no gradient has a zero one.
        out = []
        for t in tensors:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
            out.append(t.grad)
        return out

    def apply_update(self, rate: float, iter: int, gradient_hooks: Sequence[GradientHook] = ()) -> None:
        """One weight update, in ``SGDSolver::ApplyUpdate``'s order (see the module docstring).

        Call it after the gradients of all ``iter_size`` passes are summed in ``.grad`` (and, with several
        processes, averaged; with mixed precision, unscaled). Afterwards ``.grad`` holds scratch values (the
        step subtracted, with :attr:`keep_steps`); zero it before the next iteration's passes, as Caffe's
        ``ClearParamDiffs``.

        Params are processed in chunks (all steps for one chunk, then the next), which gives the same result
        as Caffe's param-by-param loop because after clipping each param's update depends on that param alone.

        Args:
            rate: the learning rate from :meth:`LrSchedule.rate`; rounded to float32 here, as Caffe's
                ``Dtype rate``.
            iter: completed updates before this one (Adam's ``t`` is ``iter + 1``).
            gradient_hooks: callables ``hook(tensors)`` run for each chunk of params after Normalize and
                Regularize and before the rule. A hook adds its term to the ``.grad`` of those of ``tensors``
                it targets, computed from those tensors alone (the sparsity penalty).
        """
        rate = _f32(rate)
        # Caffe's accum_normalization = Dtype(1) / iter_size.
        normalization = _f32(1.0 / self.iter_size)
        with torch.no_grad():
            grads = [self._grads(c.tensors) for c in self._chunks]
            if self.clip_gradients >= 0:
                self._clip([t for gs in grads for t in gs])
            for c, gs in zip(self._chunks, grads):
                if self.iter_size > 1:
                    torch._foreach_mul_(gs, normalization)
                local_decay = _f32(self.weight_decay * c.decay_mult)
                if local_decay != 0:  # Caffe skips Regularize (and never reads the type) when this is 0
                    if self.regularization_type == "L2":
                        torch._foreach_add_(gs, c.tensors, alpha=local_decay)
                    else:
                        torch._foreach_add_(gs, torch._foreach_sign(c.tensors), alpha=local_decay)
                for hook in gradient_hooks:
                    hook(c.tensors)
                steps = self._compute(c, gs, _f32(rate * c.lr_mult), iter)
                torch._foreach_sub_(c.tensors, steps)
                if self.keep_steps:
                    torch._foreach_copy_(gs, steps)

    def _clip(self, grads: list[torch.Tensor]) -> None:
        # The norm is of the summed gradient over all params, before 1/iter_size and weight decay.
        norms = torch._foreach_norm(grads)
        l2 = torch.stack(norms).double().square().sum().sqrt().item() if norms else 0.0
        if l2 > self.clip_gradients:
            scale = _f32(self.clip_gradients / l2)
            _log.info("Gradient clipping: scaling down gradients (L2 norm %g > %g) by scale factor %g",
                      l2, self.clip_gradients, scale)
            torch._foreach_mul_(grads, scale)

    def _compute(self, chunk: _Chunk, grads: list[torch.Tensor], local_rate: float, iter: int) -> list[torch.Tensor]:
        """``ComputeUpdateValue`` for one chunk: update the history, return the steps to subtract."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.params)} params, {len(self.history)} history blobs, "
                f"momentum={self.momentum:g}, weight_decay={self.weight_decay:g} {self.regularization_type}, "
                f"iter_size={self.iter_size}, clip_gradients={self.clip_gradients:g})")


def _strip(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


@register_rule("SGD")
class SGD(UpdateRule):
    """Caffe's SGD: ``h = momentum * h + local_rate * g``; ``w -= h``.

    The rate lives inside the history, so this equals ``torch.optim.SGD(lr, momentum, weight_decay)`` while the
    rate is constant and differs from it after every rate change (see the module docstring); slim follows Caffe.
    """

    def _compute(self, chunk, grads, local_rate, iter):
        (h,) = chunk.history
        torch._foreach_mul_(h, self.momentum)
        torch._foreach_add_(h, grads, alpha=local_rate)
        return h


@register_rule("Nesterov")
class Nesterov(UpdateRule):
    """Caffe's Nesterov: ``h' = momentum * h + local_rate * g``; ``w -= (1 + momentum) * h' - momentum * h``.

    Equals ``torch.optim.SGD(..., nesterov=True)`` at a constant rate; like SGD it keeps the rate in its history.
    """

    def _compute(self, chunk, grads, local_rate, iter):
        (h,) = chunk.history
        old = torch._foreach_mul(h, -self.momentum)
        torch._foreach_mul_(h, self.momentum)
        torch._foreach_add_(h, grads, alpha=local_rate)
        torch._foreach_add_(old, h, alpha=_f32(1.0 + self.momentum))
        return old


def _check_no_momentum(rule: UpdateRule) -> None:
    if rule.momentum != 0:
        rule._fail(f"momentum cannot be used with {rule.type} (Caffe CHECKs momentum == 0), but momentum is "
                   f"{rule.momentum:g}. Remove momentum from the solver.")


def _rms_step(grads, h, delta: float, local_rate):
    """``local_rate * g / (sqrt(h) + delta)`` in place of the gradients (AdaGrad's and RMSProp's step)."""
    denom = torch._foreach_sqrt(h)
    torch._foreach_add_(denom, delta)
    torch._foreach_div_(grads, denom)
    torch._foreach_mul_(grads, local_rate)
    return grads


@register_rule("AdaGrad")
class AdaGrad(UpdateRule):
    """Caffe's AdaGrad: ``h += g^2``; ``w -= local_rate * g / (sqrt(h) + delta)``. Needs momentum 0."""

    def _check(self, solver):
        _check_no_momentum(self)

    def _compute(self, chunk, grads, local_rate, iter):
        (h,) = chunk.history
        torch._foreach_addcmul_(h, grads, grads)
        return _rms_step(grads, h, self.delta, local_rate)


@register_rule("RMSProp")
class RMSProp(UpdateRule):
    """Caffe's RMSProp: ``h = d * h + (1 - d) * g^2``; ``w -= local_rate * g / (sqrt(h) + delta)``, d = rms_decay.

    Needs momentum 0 and 0 <= rms_decay < 1.
    """

    def _check(self, solver):
        _check_no_momentum(self)
        self.rms_decay = solver.rms_decay
        if not 0 <= self.rms_decay < 1:
            self._fail(f"RMSProp needs 0 <= rms_decay < 1, but rms_decay is {self.rms_decay:g}. Set rms_decay "
                       f"(0.98 or 0.99 is usual).")

    def _compute(self, chunk, grads, local_rate, iter):
        (h,) = chunk.history
        torch._foreach_mul_(h, self.rms_decay)
        torch._foreach_addcmul_(h, grads, grads, value=_f32(1.0 - self.rms_decay))
        return _rms_step(grads, h, self.delta, local_rate)


@register_rule("AdaDelta")
class AdaDelta(UpdateRule):
    """Caffe's AdaDelta (m = momentum)::

        h1 = m * h1 + (1 - m) * g^2
        u  = g * sqrt((h2 + delta) / (h1 + delta))
        h2 = m * h2 + (1 - m) * u^2
        w -= local_rate * u

    History: the N ``h1`` tensors, then the N ``h2`` tensors.
    """

    history_per_param = 2

    def _compute(self, chunk, grads, local_rate, iter):
        h1, h2 = chunk.history
        one_minus = _f32(1.0 - self.momentum)
        torch._foreach_mul_(h1, self.momentum)
        torch._foreach_addcmul_(h1, grads, grads, value=one_minus)
        ratio = torch._foreach_add(h2, self.delta)
        torch._foreach_div_(ratio, torch._foreach_add(h1, self.delta))
        torch._foreach_sqrt_(ratio)
        torch._foreach_mul_(grads, ratio)
        torch._foreach_mul_(h2, self.momentum)
        torch._foreach_addcmul_(h2, grads, grads, value=one_minus)
        torch._foreach_mul_(grads, local_rate)
        return grads


@register_rule("Adam")
class Adam(UpdateRule):
    """Caffe's Adam (beta1 = momentum, beta2 = momentum2, t = iter + 1)::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        w -= local_rate * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + delta)

    ``delta`` is added to the uncorrected ``sqrt(v)`` (torch adds its eps to the corrected one). History: the
    N ``m`` tensors, then the N ``v`` tensors.
    """

    history_per_param = 2

    def _check(self, solver):
        self.momentum2 = solver.momentum2

    def _compute(self, chunk, grads, local_rate, iter):
        m, v = chunk.history
        t = iter + 1
        beta1, beta2 = self.momentum, self.momentum2
        correction = _f32(math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t))
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=_f32(1.0 - beta1))
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=_f32(1.0 - beta2))
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, self.delta)
        steps = torch._foreach_div(m, denom)
        torch._foreach_mul_(steps, _f32(local_rate * correction))
        return steps


def create_rule(solver: pb.SolverParameter, params: Sequence[LearnableParamLike],
                source: str = "the solver") -> UpdateRule:
    """Build the update rule named by ``solver.type``.

    The deprecated ``solver_type`` enum is upgraded to ``type`` by the solver reader
    (:func:`slim.io.read_solver`); a SolverParameter that still carries it is refused rather than guessed at.

    Args:
        solver: the solver definition.
        params: the train net's learnable params, in order.
        source: the solver's file name, used in error messages.

    Raises:
        SolverError: unknown type, a rule's constraint violated, or an unknown regularization_type.
    """
    if solver.HasField("solver_type"):
        raise SolverError(f"{source}: the deprecated solver_type field is still set. Read the solver with "
                          f"slim.io.read_solver or pass it through slim.io.upgrade_solver, which turn it into type, "
                          f"or replace solver_type with type: \"SGD\" (or Nesterov, AdaGrad, RMSProp, AdaDelta, "
                          f"Adam).")
    name = solver.type
    if name not in RULES:
        hint = [k for k in RULES if k.lower() == name.lower()]
        raise SolverError(f"{source}: solver type \"{name}\" is unknown; the known types are "
                          f"{', '.join(RULES)} (case-sensitive"
                          + (f"; did you mean \"{hint[0]}\"?)." if hint else ")."))
    return RULES[name](solver, params, source)
