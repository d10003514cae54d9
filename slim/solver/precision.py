"""Mixed precision for training (``--amp bf16|fp16``): options that change speed, not the recipe.

* ``bf16``: forward passes under ``torch.autocast`` with bfloat16; weights, gradients and the update stay float32.
* ``fp16``: the same with float16, plus torch's ``GradScaler``: the loss is multiplied by a dynamic scale before
  backward so small gradients survive float16; after the gradient all-reduce the gradients are unscaled, and
  only then do clipping, weight decay, the sparsity penalty and the update rule see them. An iteration whose
  gradients overflowed is skipped (the scale is halved), as torch does; the iteration count still advances.

Autocast needs the device to support the dtype (CPU autocast supports both in recent torch; CUDA float16 always,
bfloat16 from Ampere on).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Optional, Sequence, Tuple

import torch

from slim.errors import SolverError

__all__ = ["AMP_DTYPES", "MixedPrecision"]

_log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _UpdateStep:
    """What GradScaler needs of an optimizer: ``param_groups`` to unscale and ``step()`` to run the update."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.param_groups = [{"params": list(tensors)}]
        self.update: Optional[Callable[[], None]] = None

    def step(self) -> None:
        self.update()


class MixedPrecision:
    """Autocast (and for fp16 a gradient scaler) for one training process.

    Args:
        amp: None (float32 throughout), "bf16" or "fp16".
        device: the training device.
        tensors: the learnable tensors (their gradients are unscaled with fp16).
    """

    def __init__(self, amp: Optional[str], device: torch.device, tensors: Sequence[torch.Tensor]) -> None:
        if amp is not None and amp not in AMP_DTYPES:
            raise SolverError(f"--amp must be bf16 or fp16, found \"{amp}\".")
        self.amp = amp
        self.device = torch.device(device)
        self.dtype = AMP_DTYPES.get(amp)
        self.scaler = None
        self._step = None
        if amp == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
            self._step = _UpdateStep([t for t in tensors if t.requires_grad])

    def _scaler_dict(self) -> dict:
        """The gradient scaler's state_dict; empty without a scaler, or with a disabled one."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def scaler_state(self) -> Optional[Tuple[float, int]]:
        """(scale, overflow-free iterations since it last changed) of the fp16 gradient scaler, for snapshots;
        None without one."""
        state = self._scaler_dict()
        return (float(state["scale"]), int(state["_growth_tracker"])) if state else None

    def load_scaler_state(self, scale: float, growth: int) -> None:
        """Restore ``scaler_state`` (nothing to do without fp16: a resumed run may change --amp)."""
        state = self._scaler_dict()
        if state:
            state.update(scale=float(scale), _growth_tracker=int(growth))
            self.scaler.load_state_dict(state)

    def autocast(self) -> ContextManager:
        """The context for forward passes."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with the loss scaled for fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, update: Callable[[], None]) -> bool:
        """Run ``update`` on unscaled gradients; with fp16, skip it when they overflowed.

        Returns:
            Whether the update ran.
        """
        if self.scaler is None:
            update()
            return True
        done = []
        self._step.update = lambda: (update(), done.append(True))
        self.scaler.unscale_(self._step)
        self.scaler.step(self._step)
        scale = self.scaler.get_scale()
        self.scaler.update()
        if not done:
            _log.warning("fp16 gradients overflowed at loss scale %g; this iteration's update is skipped and the "
                         "scale lowered to %g", scale, self.scaler.get_scale())
        return bool(done)
