"""Caffe's learning-rate policies, exactly as ``SGDSolver::GetLearningRate``.

``iter`` is the number of completed weight updates (Caffe's ``iter_``): the rate used by the update that turns
iteration ``iter`` into ``iter + 1``. Rates are computed here in float64; the update rule rounds the result to
float32 where Caffe holds it in ``Dtype rate`` (see :meth:`slim.solver.rules.UpdateRule.apply_update`).

Policies (``base_lr`` is :math:`b`)::

    fixed      b
    step       b * gamma ^ floor(iter / stepsize)                 sets current_step = iter / stepsize
    exp        b * gamma ^ iter
    inv        b * (1 + gamma * iter) ^ (-power)
    multistep  b * gamma ^ current_step                           current_step advances by at most 1 per call
    poly       b * (1 - iter / max_iter) ^ power
    sigmoid    b / (1 + exp(-gamma * (iter - stepsize)))

Every field a policy reads is checked when the schedule is built. Caffe's proto2 fields default to 0 when
absent. An unset ``lr_policy`` or ``base_lr`` is refused (Caffe fails at the first update, or never changes the
weights); an unset ``gamma`` or ``power`` is accepted as Caffe runs it, with its implicit 0, and a warning that
says what the schedule then does (real solver files rely on it, e.g. ``step`` without gamma: base_lr until the
first step, 0 after it). Range checks (stepsize > 0, gamma >= 0, ...) are Caffe's CHECKs and stay errors.
"""

from __future__ import annotations

import logging
import math
import warnings

from slim import proto as pb
from slim.errors import SolverError

__all__ = ["LR_POLICIES", "LrSchedule"]

_log = logging.getLogger(__name__)

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

# The fields each policy reads besides base_lr. An unset stepsize or max_iter fails its range check below; an
# unset gamma or power is Caffe's implicit 0 (warned about).
_NEEDS = {
    "fixed": (),
    "step": ("gamma", "stepsize"),
    "exp": ("gamma",),
    "inv": ("gamma", "power"),
    "multistep": ("gamma",),
    "poly": ("power", "max_iter"),
    "sigmoid": ("gamma", "stepsize"),
}


# What a policy's rate becomes when gamma or power is left at Caffe's implicit 0 (0 ** 0 is 1).
_DEGENERATE = {
    ("step", "gamma"): "base_lr until iteration stepsize, 0 after it",
    ("exp", "gamma"): "base_lr at iteration 0, 0 after it",
    ("inv", "gamma"): "base_lr throughout",
    ("inv", "power"): "base_lr throughout",
    ("multistep", "gamma"): "base_lr until the first stepvalue, 0 after it",
    ("poly", "power"): "base_lr throughout",
    ("sigmoid", "gamma"): "base_lr / 2 throughout",
}


class LrSchedule:
    """The learning rate of a solver as a function of the completed-update count.

    Stateful for ``multistep`` (and ``step``, which overwrites it): :attr:`current_step` is Caffe's
    ``current_step_``, saved in and restored from ``SolverState.current_step``. Call :meth:`rate` exactly once
    per update, as Caffe calls ``GetLearningRate`` once per ``ApplyUpdate``: a multistep schedule whose
    ``current_step`` lags behind ``iter`` (after a restore, or a changed ``stepvalue``) catches up one step per
    call, not at once.

    Example::

        >>> s = pb.SolverParameter(base_lr=0.1, lr_policy="multistep", gamma=0.1, stepvalue=[2, 4])
        >>> sched = LrSchedule(s, "solver.prototxt")
        >>> [round(sched.rate(i), 6) for i in range(6)]
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]

    Args:
        solver: the solver definition; ``lr_policy``, ``base_lr`` and the fields the policy reads.
        source: the solver's file name, used in error messages.

    Raises:
        SolverError: the policy or base_lr is unset, the policy is unknown, or a field it reads is out of range.
    """

    def __init__(self, solver: pb.SolverParameter, source: str = "the solver") -> None:
        self.source = source
        self.policy = solver.lr_policy
        self.base_lr = solver.base_lr
        self.gamma = solver.gamma
        self.power = solver.power
        self.stepsize = solver.stepsize
        self.max_iter = solver.max_iter
        self.stepvalue = tuple(solver.stepvalue)
        self.current_step = 0
        self._check(solver)

    def _fail(self, what: str) -> None:
        raise SolverError(f"{self.source}: {what}")

    def _check(self, solver: pb.SolverParameter) -> None:
        policy = self.policy
        if not solver.HasField("lr_policy") or policy == "":
            self._fail(f"lr_policy is not set, and Caffe has no default for it. Set lr_policy to one of "
                       f"{', '.join(LR_POLICIES)} (lr_policy: \"fixed\" keeps base_lr throughout).")
        if policy not in _NEEDS:
            hint = [p for p in LR_POLICIES if p.lower() == policy.lower()]
            self._fail(f"lr_policy \"{policy}\" is not a learning-rate policy; the known ones are "
                       f"{', '.join(LR_POLICIES)} (names are case-sensitive"
                       + (f"; did you mean \"{hint[0]}\"?)." if hint else ")."))
        if not solver.HasField("base_lr"):
            self._fail("base_lr is not set; Caffe's implicit default of 0 would never change the weights. "
                       "Set base_lr (0.1 is usual for SGD with momentum on CIFAR).")
        for name in _NEEDS[policy]:
            if not solver.HasField(name) and name in ("gamma", "power"):
                warnings.warn(f"{self.source}: lr_policy \"{policy}\" reads {name}, which is not set; Caffe uses its "
                              f"implicit default 0, and so does slim (the rate is then {_DEGENERATE[policy, name]}). "
                              f"Set {name} if that is not what you meant.", UserWarning, stacklevel=4)
        if policy in ("step", "sigmoid") and self.stepsize <= 0:
            self._fail(f"lr_policy \"{policy}\" needs stepsize > 0, but stepsize is {self.stepsize}. "
                       f"Set stepsize to the number of iterations per step.")
        if policy in ("step", "exp", "inv", "multistep", "sigmoid") and self.gamma < 0:
            self._fail(f"lr_policy \"{policy}\" needs gamma >= 0, but gamma is {self.gamma:g}. Set gamma to a "
                       f"non-negative factor (0.1 divides the rate by 10 at each step).")
        if policy == "poly" and self.max_iter <= 0:
            self._fail(f"lr_policy \"poly\" needs max_iter > 0, but max_iter is {self.max_iter}. Set max_iter "
                       f"to the iteration at which the rate reaches 0.")
        if policy == "multistep":
            if not self.stepvalue:
                self._fail("lr_policy \"multistep\" has no stepvalue, so the rate would never change. Add one "
                           "stepvalue: N line per step, or use lr_policy: \"fixed\".")
            for a, b in zip(self.stepvalue, self.stepvalue[1:]):
                if b <= a:
                    self._fail(f"lr_policy \"multistep\" needs strictly increasing stepvalue entries, but "
                               f"{b} follows {a} in stepvalue {list(self.stepvalue)}. Sort them and remove "
                               f"duplicates.")

    def rate(self, iter: int) -> float:
        """The learning rate of the update after ``iter`` completed updates (``GetLearningRate``).

        Args:
            iter: completed updates so far (0 for the first update).

        Returns:
            The rate in float64; the update rounds it to float32 as Caffe does.
        """
        policy = self.policy
        if policy == "fixed":
            return self.base_lr
        if policy == "step":
            self.current_step = iter // self.stepsize
            return self.base_lr * self.gamma ** self.current_step
        if policy == "exp":
            return self.base_lr * self.gamma ** iter
        if policy == "inv":
            return self.base_lr * (1.0 + self.gamma * iter) ** -self.power
        if policy == "multistep":
            # At most one advance per call, even when iter has passed several step values (Caffe's quirk).
            if self.current_step < len(self.stepvalue) and iter >= self.stepvalue[self.current_step]:
                self.current_step += 1
                _log.info("MultiStep Status: Iteration %d, step = %d", iter, self.current_step)
            return self.base_lr * self.gamma ** self.current_step
        if policy == "poly":
            if iter > self.max_iter:
                self._fail(f"lr_policy \"poly\" is defined up to max_iter {self.max_iter}, but the rate was "
                           f"asked for iteration {iter}. Raise max_iter to continue training.")
            return self.base_lr * (1.0 - iter / self.max_iter) ** self.power
        # sigmoid; exp() overflows to inf for a very negative argument, where the rate is 0.
        x = -self.gamma * (iter - self.stepsize)
        return 0.0 if x > 700.0 else self.base_lr / (1.0 + math.exp(x))

    def __repr__(self) -> str:
        fields = {"fixed": "", "step": f", gamma={self.gamma:g}, stepsize={self.stepsize}",
                  "exp": f", gamma={self.gamma:g}", "inv": f", gamma={self.gamma:g}, power={self.power:g}",
                  "multistep": f", gamma={self.gamma:g}, stepvalue={list(self.stepvalue)}",
                  "poly": f", power={self.power:g}, max_iter={self.max_iter}",
                  "sigmoid": f", gamma={self.gamma:g}, stepsize={self.stepsize}"}[self.policy]
        return (f"LrSchedule({self.policy}, base_lr={self.base_lr:g}{fields}, "
                f"current_step={self.current_step})")
