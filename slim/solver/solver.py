"""The training loop: Caffe's ``Solver::Step`` and ``Solver::Solve`` on PyTorch.

    solver = Solver("solvers/demo_digits_sparse.prototxt")      # nets built, weights loaded, checks done
    solver.solve()                                              # train to max_iter, test, snapshot

One iteration (REFERENCE §2.1), ``iter`` counting completed updates::

    zero the gradients                                           ClearParamDiffs
    test every test net       if test_interval and iter % test_interval == 0 and (iter > 0 or test_initialization)
    iter_size x forward + backward, loss = mean of the passes    gradients add up over the passes
    smoothed loss             the mean of the last average_loss losses
    display                   if display and iter % display == 0: Caffe's lines, gamma statistics, metrics
    all-reduce                gradients summed over processes, scaled by 1/processes (several processes only)
    update                    lr = policy(iter); clip, 1/iter_size, weight decay, sparsity penalty, update rule
    iter += 1
    snapshot                  if snapshot and iter % snapshot == 0, or on a signal's request

After ``max_iter``: a final snapshot (``snapshot_after_train``, unless one was just taken), a forward-only pass to
display the loss, a final test, "Optimization Done.".

Slim's additions to Caffe's loop: the sparsity penalty (network slimming) as a gradient hook of the update, after
the all-reduce and after fp16 unscaling; a non-finite loss stops training with a SolverError naming the iteration
and no snapshot is written from then on (the last good one stays); hooks (:class:`Hook`) around each iteration.
The smoothed loss is recomputed as the mean of its window each iteration (Caffe updates it incrementally; the
value is the same up to rounding), and the window survives ``step`` calls and snapshots (Caffe clears it at
every ``Step`` call, so after a resume), so a resumed run logs what the uninterrupted run logs.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from slim import proto as pb
from slim.errors import OutputError, SlimError, SolverError
from slim.solver.distributed import FLAGS, Distributed, GradientReducer, all_gather_bytes, broadcast_tensors
from slim.solver.evaluate import Evaluation, evaluate, output_loss_weights, output_scores
from slim.solver.logs import MetricsFile, ProgressBar, fmt
from slim.solver.lr import LrSchedule
from slim.solver.nets import resolve_path, solver_nets, split_weights
from slim.solver.precision import MixedPrecision
from slim.solver.rules import RULES, create_rule
from slim.solver.signals import Action
from slim.solver.snapshot import (DataPosition, ResumeState, check_prefix, read_snapshot, unpaired_caffemodels,
                                  write_snapshot)
from slim.solver.sparsity import create_sparsity

__all__ = ["Solver", "Hook", "PeerFailure"]

_log = logging.getLogger(__name__)


class PeerFailure(SolverError):
    """Raised on a training process that stops because another process failed or saw the loss diverge.

    The process that saw the problem reports it; this one stops without repeating it (``reported_elsewhere``), so a
    run of several processes prints one true message.
    """

    reported_elsewhere = True


class Hook:
    """Called around every iteration; subclass and override what you need (detectron2's hook order).

    ``before_step`` runs at the start of an iteration, before the test and the forward passes (``solver.iter``
    is the iteration about to run); an exception there is shared with the other processes, which stop too.
    ``after_backward`` runs once the gradients of the iteration's passes are complete (after the all-reduce and
    the display), before the update: Caffe's ``on_gradients_ready``, where a hook may read or change them.
    ``after_step`` runs after the update (``solver.iter`` already advanced), before the snapshot check.
    A hook may call ``solver.request(Action.STOP)`` or ``Action.SNAPSHOT`` in ``before_step`` to act at the end
    of that iteration, exactly as a signal does.
    """

    def before_step(self, solver: "Solver") -> None:
        """Start of iteration ``solver.iter``."""

    def after_backward(self, solver: "Solver") -> None:
        """Gradients of iteration ``solver.iter`` complete, before its update."""

    def after_step(self, solver: "Solver") -> None:
        """After the update that made ``solver.iter``."""


class Solver:
    """A Caffe solver driving slim nets: build from a solver prototxt, then :meth:`solve` (or :meth:`step`).

    Everything that can fail on user input fails here, in the constructor, before the first iteration: the
    solver's fields, the nets, the data, the weights, the snapshot to resume from, the snapshot folder.

    Args:
        solver: a solver prototxt path, or a SolverParameter (then ``solver_path`` names it in messages and anchors
            relative net paths; its snapshot_prefix is used as it is).
        solver_path: the solver file when ``solver`` is a message.
        weights: .caffemodel paths to initialise from (``--weights``); None uses the solver's ``weights`` field.
        snapshot: a .solverstate to resume from (``--snapshot``); the solver's ``weights`` are then ignored.
        dist: this process's place among several (default: one process on ``device``).
        device: the device of a single process (default CPU); ignored when ``dist`` is given.
        amp: None, "bf16" or "fp16" (see slim.solver.precision).
        channels_last: keep 4-D weights (and so activations) in channels-last memory format.
        compile: run the train net's forward through ``torch.compile`` (eager, with a warning, if that fails).
        hooks: :class:`Hook` objects.
        progress: a progress bar to update (root process).
        metrics: write the metrics file (root process).

    Attributes:
        param: the SolverParameter.
        net: the train net.
        test_nets: the test nets (root process only; empty elsewhere).
        iter: completed updates.
        schedule: the learning-rate schedule.
        rule: the update rule (its ``history`` is SolverState.history).
        sparsity: the network-slimming penalty (penalty 0 when the solver sets none).
        loss: the last iteration's loss (the mean of its ``iter_size`` passes; nan before the first).
        smoothed_loss: the mean of the last ``average_loss`` losses (nan before the first iteration).
        last_snapshot: the last solverstate written (or resumed from), or None.
    """

    def __init__(self, solver: Union[str, Path, "pb.SolverParameter"], *, solver_path: Optional[str] = None,
                 weights: Optional[Sequence[str]] = None, snapshot: Optional[str] = None,
                 dist: Optional[Distributed] = None, device=None, amp: Optional[str] = None,
                 channels_last: bool = False, compile: bool = False, hooks: Sequence[Hook] = (),
                 progress: Optional[ProgressBar] = None, metrics: bool = True) -> None:
        from slim.io import read_solver

        if isinstance(solver, (str, Path)):
            solver_path = os.fspath(solver)
            solver = read_solver(solver_path)
        self.param = pb.SolverParameter()
        self.param.CopyFrom(solver)
        self.solver_path = solver_path
        self.source = solver_path or "the solver"
        self.dist = dist if dist is not None else Distributed(device=torch.device(device or "cpu"))
        self.device = self.dist.device
        self.hooks = list(hooks)
        self.progress = progress if self.dist.is_root else None
        if weights is not None and snapshot is not None:
            raise SolverError("--weights and --snapshot were both given; --snapshot resumes a run (its weights come "
                              "from the snapshot), --weights starts one from a caffemodel. Give one of them.")
        self._check_fields()
        self.schedule = LrSchedule(self.param, self.source)
        p = self.param

        nets = solver_nets(p, solver_path)
        seed = int(p.random_seed) if p.random_seed >= 0 else None
        self.net = self._build(nets.train, seed, self.dist.rank, self.dist.world_size)
        self._check_train_net()
        self.test_specs = nets.tests
        self.test_nets = []
        if self.dist.is_root:
            self.test_nets = [self._build(spec, seed, 0, 1) for spec in nets.tests]

        if snapshot is None:
            if weights is not None:
                files = split_weights(weights)
            else:
                files = [resolve_path(w, solver_path, "weights") for w in split_weights(p.weights)]
            for path in files:
                _log.info("Finetuning from %s", path)
                for net in [self.net, *self.test_nets]:
                    net.load_weights(path)
        elif p.weights:
            _log.info("Resuming from %s: the solver's weights (%s) are ignored", snapshot, ", ".join(p.weights))
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        for net in self.test_nets:
            net.share_from(self.net)

        params = self.net.learnable_params
        self.rule = create_rule(p, params, self.source)
        self.sparsity = create_sparsity(p, params, self.net.scaling_factors(), self.source)
        self._tensors = [q.tensor for q in params]
        if seed is not None:
            # Fillers and data order use ``seed`` itself (identical on every process); Dropout's draws differ per
            # process, as Caffe's seed + rank.
            torch.manual_seed(seed + self.dist.rank)
        elif self.dist.enabled:
            torch.manual_seed(torch.initial_seed() + self.dist.rank)  # no seed given: still a stream per process
        self._reducer = None
        if self.dist.enabled:
            broadcast_tensors(self._tensors, self.dist)
            self._reducer = GradientReducer(self._tensors, self.dist)
        self.precision = MixedPrecision(amp, self.device, self._tensors)
        self._forward = _CompiledForward(self.net, lambda: self.iter) if compile else self.net
        # The train net's passes can be replaced (slim.caffe runs its own, layer by layer, so every blob's data and
        # diff hold what Caffe's would): an object whose forward() and forward_backward() return a NetOutput.
        # Likewise test_passes: one stand-in per test net for evaluate (with the net's ``graph``, called for a
        # NetOutput), so that a test leaves its last batch in the pycaffe test net's blobs.
        self.passes = None
        self.test_passes = None
        self._loss_weights = output_loss_weights(self.net)

        self.iter = 0
        self.loss = math.nan
        self._losses: collections.deque = collections.deque(maxlen=p.average_loss)
        self._requests: set[Action] = set()
        self.requested_early_exit = False
        self.last_tests: list[Optional[Evaluation]] = []   # test_all's results, at iteration tested_at
        self.tested_at = -1
        self.last_snapshot: Optional[str] = None
        self._snapshot_iter: Optional[int] = None
        self._last_outputs = None
        self._timer = (time.monotonic(), 0)
        self.metrics = None
        if self.dist.is_root and metrics:
            self.metrics = MetricsFile(p.metrics_file or p.snapshot_prefix + ".metrics.jsonl")
        if self.dist.is_root and (p.snapshot > 0 or p.snapshot_after_train):
            check_prefix(p.snapshot_prefix, self.iter, self.source, snapshot_bytes=self._snapshot_bytes())
        if snapshot is not None:
            self.restore(snapshot)

    # ----- construction ----------------------------------------------------------------------------------------
    def _check_fields(self) -> None:
        p, src = self.param, self.source
        if p.type not in RULES:
            hint = [k for k in RULES if k.lower() == p.type.lower()]
            raise SolverError(f"{src}: solver type \"{p.type}\" is unknown; the known types are {', '.join(RULES)} "
                              f"(case-sensitive" + (f"; did you mean \"{hint[0]}\"?)." if hint else ")."))
        if p.max_iter < 0:
            raise SolverError(f"{src}: max_iter is {p.max_iter}; set max_iter to the number of updates to run.")
        if p.average_loss < 1:
            raise SolverError(f"{src}: average_loss must be at least 1, found {p.average_loss}.")
        if p.display < 0 or p.snapshot < 0 or p.test_interval < 0:
            raise SolverError(f"{src}: display, snapshot and test_interval must not be negative (0 turns them off).")
        if p.snapshot_format != pb.SolverParameter.BINARYPROTO:
            raise SolverError(f"{src}: snapshot_format HDF5 is not supported; remove snapshot_format (the default "
                              f"BINARYPROTO writes .caffemodel and .solverstate files).")
        for name in ("snapshot_prefix", "metrics_file", "net", "train_net"):
            if "\0" in getattr(p, name):
                raise SolverError(f"{src}: {name} {getattr(p, name)!r} contains a NUL byte, which no file name may "
                                  f"hold. Fix {name}.")
        if not p.snapshot_prefix and (p.snapshot > 0 or p.snapshot_after_train):
            raise SolverError(f"{src}: snapshot_prefix is empty; set it to where snapshots go, e.g. "
                              f"snapshot_prefix: \"snapshots/run\".")
        for name, what in (("snapshot_diff", "gradients are not written into snapshots"),
                           ("debug_info", "per-layer debug statistics are not logged")):
            if getattr(p, name):
                warnings.warn(f"{src}: {name} is set but slim ignores it ({what}).", stacklevel=3)

    def _build(self, spec, seed, rank, world_size):
        from slim.graph import build_graph
        from slim.net import Net

        graph = build_graph(spec.net, source=spec.source, state=spec.state)
        phase = "TRAIN" if spec.state.phase == pb.TRAIN else "TEST"
        _log.info("Creating %s net from %s", phase.lower(), spec)
        return Net(graph, seed=seed, device=self.device, rank=rank, world_size=world_size, data_seed=seed)

    def _check_train_net(self) -> None:
        g = self.net.graph
        if g.inputs:
            raise SolverError(f"{g.source}: the train net has Input blobs ({', '.join(g.inputs)}) that nothing feeds "
                              f"during training. Replace the Input layer by a data layer (SlimData, Data, ImageData, "
                              f"MemoryData or DummyData).")
        if not g.loss_layers:
            raise SolverError(f"{g.source}: the train net has no loss (no layer with a non-zero loss_weight), so there "
                              f"is nothing to minimise. Add a loss layer such as SoftmaxWithLoss.")

    # ----- requests (signals, hooks) ---------------------------------------------------------------------------
    def request(self, action: Action) -> None:
        """Ask for a snapshot or a stop at the end of the current iteration (what a signal handler calls)."""
        action = Action(action)
        if action is not Action.NONE:
            self._requests.add(action)

    # ----- the loop --------------------------------------------------------------------------------------------
    @property
    def smoothed_loss(self) -> float:
        """The mean of the last ``average_loss`` losses, what the display lines print (nan before any)."""
        return sum(self._losses) / len(self._losses) if self._losses else math.nan

    def _zero_grads(self) -> None:
        # Caffe's ClearParamDiffs. None lets autograd write the first pass's gradient without a separate memset;
        # with several processes the gradients live in the reducer's flat buffers, which it zeroes.
        for t in self._tensors:
            if self._reducer is None or not t.requires_grad:
                t.grad = None
        if self._reducer is not None:
            self._reducer.zero()

    def _test_due(self) -> bool:
        p = self.param
        return bool(p.test_interval) and self.iter % p.test_interval == 0 and (self.iter > 0 or p.test_initialization)

    def _forward_backward(self) -> torch.Tensor:
        if self.passes is not None:
            out = self.passes.forward_backward()
        else:
            with self.precision.autocast():
                out = self._forward()
            self.precision.backward(out.loss)
        self._last_outputs = out
        return out.loss.detach().float()

    def _sum_passes(self) -> torch.Tensor:
        loss = None
        for _ in range(self.param.iter_size):
            pass_loss = self._forward_backward()
            loss = pass_loss if loss is None else loss + pass_loss
        return loss

    def _passes(self) -> torch.Tensor:
        """The iteration's ``iter_size`` forward/backward passes, their losses summed.

        torch.compile compiles lazily, the backward at the first backward and again whenever a guard fails, so a
        compiled net can fail at any iteration, in the forward or the backward. Then it is given up with one warning
        and the iteration runs again eagerly from where it began: the same batches, no gradient of the failed
        attempt, and the BatchNorm statistics as they were.
        """
        compiled = self._forward if isinstance(self._forward, _CompiledForward) and self.passes is None else None
        if compiled is None or compiled.gave_up:
            return self._sum_passes()
        data_state = self.net.data_state()
        frozen = [t for t in self._tensors if not t.requires_grad]
        saved = [t.detach().clone() for t in frozen]
        try:
            return self._sum_passes()
        except SlimError:
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            compiled.give_up(e)
            self.net.load_data_state(data_state)
            with torch.no_grad():
                for t, value in zip(frozen, saved):
                    t.copy_(value)
            self._zero_grads()
            return self._sum_passes()

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (fewer if a stop is requested), as Caffe's ``Solver::Step``.

        Raises:
            SolverError: the loss became NaN or infinite, or another process failed.
            OutputError: a snapshot or the metrics file could not be written (full or read-only disk).
        """
        p = self.param
        stop_iter = self.iter + iters
        self.requested_early_exit = False
        self._timer = (time.monotonic(), self.iter)  # Caffe's iteration_timer_ starts with Step
        deferred: Optional[BaseException] = None  # a failed snapshot write, known only to the root process
        while self.iter < stop_iter:
            failure, deferred = deferred, None
            loss_value = math.nan
            display = False
            try:
                if failure is not None:
                    raise _Deferred
                self._zero_grads()
                for hook in self.hooks:
                    hook.before_step(self)
                if self._test_due() and self.dist.is_root:
                    self.test_all()
                display = p.display > 0 and self.iter % p.display == 0
                loss_value = float(self._passes()) / p.iter_size
            except _Deferred:
                pass  # said by the root when it happened; now shared, so that every process stops
            except Exception as e:  # shared with the other processes below, then raised
                if not self.dist.enabled:
                    raise
                # Said now, before the others learn of it and stop: a launcher may end this process soon after.
                _log.error("Iteration %d: process %d failed: %s", self.iter, self.dist.rank, e,
                           exc_info=not isinstance(e, SlimError))
                failure = e
            local = {"failed": failure is not None, "stop": Action.STOP in self._requests,
                     "snapshot": Action.SNAPSHOT in self._requests, "nonfinite": not math.isfinite(loss_value)}
            self._requests.clear()
            flags = [float(local[name]) for name in FLAGS]
            if self._reducer is not None:
                flags = self._reducer.all_reduce(flags)
            summed = dict(zip(FLAGS, flags))
            if summed["failed"]:
                if failure is not None:
                    raise failure
                raise PeerFailure(f"Iteration {self.iter}: {int(summed['failed'])} other training process(es) failed "
                                  f"(their messages are above); this process stops too.")
            if summed["nonfinite"]:
                self._diverged(loss_value)
            self.loss = loss_value
            self._losses.append(loss_value)
            record = self._display() if display and self.dist.is_root else None
            for hook in self.hooks:
                hook.after_backward(self)
            try:
                self._apply_update(display, record)
            except OutputError as e:  # the metrics file, on the root process
                if not self.dist.enabled:
                    raise
                deferred = e
            self.iter += 1
            for hook in self.hooks:
                hook.after_step(self)
            if self.progress is not None:
                self.progress.update(self.iter, p.max_iter, self.smoothed_loss)
            if (p.snapshot and self.iter % p.snapshot == 0) or summed["snapshot"]:
                try:
                    self.snapshot()
                except OutputError as e:
                    if not self.dist.enabled:
                        raise
                    deferred = deferred or e  # the others learn of it with the next iteration's flags and stop
            if summed["stop"]:
                self.requested_early_exit = True
                _log.info("Iteration %d: stop requested", self.iter)
                break
        if deferred is not None:
            raise deferred

    def _diverged(self, loss_value: float):
        if not self.dist.is_root:  # the root knows the snapshots and says it once for all
            raise PeerFailure(f"Iteration {self.iter}: the loss is not finite; process 0 reports it.")
        where = f" (loss {fmt(loss_value)} on this process)" if not math.isfinite(loss_value) else \
            " (on another process)"
        keep = (f"The last snapshot, {self.last_snapshot}, is kept; resume from it" if self.last_snapshot
                else "No snapshot was written; restart")
        raise SolverError(f"Iteration {self.iter}: the loss is not finite{where}, so training stopped before this "
                          f"update and no snapshot of these weights is written. {keep} with a lower base_lr, or set "
                          f"clip_gradients.")

    def _display(self) -> dict:
        p = self.param
        now = time.monotonic()
        t0, i0 = self._timer
        lapse = now - t0
        per_s = (self.iter - i0) / (lapse if lapse else 1.0)
        self._timer = (now, self.iter)
        _log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter, fmt(per_s), fmt(lapse), p.display,
                  fmt(self.smoothed_loss))
        scores = output_scores(self._last_outputs, self._loss_weights)
        for k, s in enumerate(scores):
            _log.info("    Train net output #%d: %s", k, s)
        record = {"kind": "train", "iter": self.iter, "loss": self.smoothed_loss, "iter_per_s": per_s,
                  "outputs": Evaluation(0, scores, 0.0).as_dict()}
        if self.sparsity.targets:
            stats = self.sparsity.stats()
            _log.info("    %s", stats)
            record["gamma"] = {"count": stats.count, "below_1e2": stats.below_1e2, "below_1e3": stats.below_1e3,
                               "min": stats.min_abs, "median": stats.median_abs}
        return record

    def _apply_update(self, display: bool, record: Optional[dict]) -> None:
        rate = self.schedule.rate(self.iter)
        if display:
            _log.info("Iteration %d, lr = %s", self.iter, fmt(rate))
        hooks = [self.sparsity] if self.sparsity.penalty else []
        self.precision.step(lambda: self.rule.apply_update(rate, self.iter, gradient_hooks=hooks))
        if record is not None:
            record["lr"] = rate
            if self.metrics is not None:  # after the update: a failed write leaves every process's weights alike
                with self._stopping_on_output_error("the metrics file"):
                    self.metrics.write(record)

    def apply_update(self) -> None:
        """One update from the gradients now in the params' ``.grad`` (Caffe's ``ApplyUpdate``, as pycaffe exposes
        it): the rate of iteration ``iter``, clipping, weight decay, the sparsity penalty and the rule. ``iter`` is
        not advanced."""
        p = self.param
        self._apply_update(bool(p.display) and self.iter % p.display == 0, None)

    def solve(self) -> bool:
        """Train from the current iteration to ``max_iter``, as Caffe's ``Solver::Solve``.

        Returns:
            True when training reached max_iter, False when a stop was requested.

        Raises:
            SolverError: training diverged or another process failed.
        """
        p = self.param
        _log.info("Solving %s", self.net.graph.name or "(unnamed net)")
        _log.info("Learning Rate Policy: %s", p.lr_policy)
        per_pass = next((int(n.top_shapes[0][0]) for n in self.net.graph.layers
                         if n.layer.is_data and n.top_shapes and n.top_shapes[0]), 0)
        # Caffe's multi-GPU rule: every process takes the prototxt's batch, so the update sees world_size times it.
        _log.info("Effective batch: %d images per update (batch %d x %d process%s x iter_size %d)",
                  per_pass * self.dist.world_size * max(1, p.iter_size), per_pass, self.dist.world_size,
                  "" if self.dist.world_size == 1 else "es", max(1, p.iter_size))
        try:
            self.step(p.max_iter - self.iter)
            if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0) \
                    and self._snapshot_iter != self.iter:
                self.snapshot()
            if self.requested_early_exit:
                _log.info("Optimization stopped early.")
                return False
            if self.dist.is_root and p.display and self.iter % p.display == 0:
                # Caffe's last display: one forward-only pass (it reads a batch and, in TRAIN phase, moves the
                # BatchNorm statistics, as Caffe's does).
                with torch.no_grad(), self.precision.autocast():
                    out = self._forward() if self.passes is None else self.passes.forward()
                self._losses.append(float(out.loss))
                _log.info("Iteration %d, loss = %s", self.iter, fmt(self.smoothed_loss))
            if self.dist.is_root and p.test_interval and self.iter % p.test_interval == 0:
                self.test_all()
            _log.info("Optimization Done.")
            return True
        finally:
            if self.progress is not None:
                self.progress.close()

    # ----- testing ---------------------------------------------------------------------------------------------
    def test_all(self) -> list[Optional[Evaluation]]:
        """Test every test net (root process only), as Caffe's ``TestAll``; kept as ``last_tests``, with
        ``tested_at`` the iteration they ran at, so a caller needs no second test of the same weights."""
        self.last_tests = [self.test(i) for i in range(len(self.test_nets))]
        self.tested_at = self.iter
        return self.last_tests

    def test(self, i: int) -> Optional[Evaluation]:
        """Run test net ``i`` for its ``test_iter`` passes on the current weights and log the means.

        Returns:
            The evaluation, or None if a stop request cut it short.
        """
        _log.info("Iteration %d, Testing net (#%d)", self.iter, i)
        if self.progress is not None:
            self.progress.clear()
        net = self.test_nets[i] if self.test_passes is None else self.test_passes[i]
        ev = evaluate(net, self.test_specs[i].test_iter, autocast=self.precision.autocast,
                      should_stop=lambda: Action.STOP in self._requests)
        if ev is None:
            _log.info("Test of net #%d interrupted by a stop request", i)
            return None
        if self.param.test_compute_loss:
            _log.info("Test loss: %s", fmt(ev.loss))
        for k, s in enumerate(ev.scores):
            _log.info("    Test net output #%d: %s", k, s)
        not_finite = [s.name for s in ev.scores if not math.isfinite(s.value)]
        if not_finite:
            why = ("an untrained net's BatchNorm has no statistics yet (test_initialization: false skips this test)"
                   if self.iter == 0 else "training has diverged (lower base_lr or set clip_gradients)")
            _log.warning("Iteration %d, test net #%d: %s not finite: the net's outputs are NaN or infinite, so its "
                         "other scores mean nothing; %s.", self.iter, i, ", ".join(not_finite), why)
        if self.metrics is not None:
            record = {"kind": "test", "iter": self.iter, "net": i, "outputs": ev.as_dict()}
            if self.param.test_compute_loss:
                record["loss"] = ev.loss
            with self._stopping_on_output_error("the metrics file"):
                self.metrics.write(record)
        return ev

    # ----- snapshots -------------------------------------------------------------------------------------------
    def snapshot(self) -> Optional[str]:
        """Write ``prefix_iter_N.caffemodel`` and ``.solverstate`` (root process; every process must call it).

        Returns:
            The solverstate path on the root process, None elsewhere.

        Raises:
            SolverError: the weights are not finite (the previous snapshot is kept).
            OutputError: the snapshot could not be written (the previous snapshot is kept, no half pair is left).
        """
        rng = all_gather_bytes(torch.get_rng_state().numpy().tobytes(), self.dist)
        cuda_rng = []
        if self.device.type == "cuda":
            cuda_rng = all_gather_bytes(torch.cuda.get_rng_state(self.device).numpy().tobytes(), self.dist)
        self._snapshot_iter = self.iter
        with torch.no_grad():
            norms = torch._foreach_norm([t for t in self._tensors if t.numel()])
            finite = bool(torch.isfinite(torch.stack(norms)).all()) if norms else True
        # The root's weights are the ones written (BatchNorm statistics may differ per process): its verdict is
        # shared, so that every process stops together and only the root says why.
        if not all_gather_bytes(bytes([finite]), self.dist)[0][0]:
            self._diverged_weights()
        if not self.dist.is_root:
            return None
        if self.progress is not None:
            self.progress.clear()
        data = [DataPosition(name, epoch, position, key) for key, net in self._data_nets().items()
                for name, (epoch, position) in net.data_state().items()]
        with self._stopping_on_output_error("its snapshot"):
            _, state_path = write_snapshot(
                self.param.snapshot_prefix, self.iter, self.net, current_step=self.schedule.current_step,
                history=self.rule.history, rng_states=rng, cuda_rng_states=cuda_rng, data=data,
                smoothed_loss=list(self._losses), world_size=self.dist.world_size,
                loss_scale=self.precision.scaler_state())
        self.last_snapshot = state_path
        return state_path

    @contextlib.contextmanager
    def _stopping_on_output_error(self, what: str):
        """Turn a failed write (full or read-only disk) into one message saying what was kept; training stops."""
        try:
            yield
        except OutputError as e:
            keep = (f"The last good snapshot, {self.last_snapshot}, is kept: resume from it with --snapshot once the "
                    f"folder takes files again" if self.last_snapshot else "No snapshot had been written yet")
            raise OutputError(f"Iteration {self.iter}: training stopped because {what} could not be written. {e} "
                              f"{keep}.") from None

    def _snapshot_bytes(self) -> int:
        """About how many bytes one snapshot pair takes: every blob of the train net plus the history, as float32."""
        blobs = sum(t.numel() for ts in self.net.params.values() for t in ts)
        return 4 * (blobs + sum(h.numel() for h in self.rule.history))

    def _diverged_weights(self):
        if not self.dist.is_root:
            raise PeerFailure(f"Iteration {self.iter}: the weights are no longer finite; process 0 reports it.")
        keep = f"the last snapshot, {self.last_snapshot}, is kept" if self.last_snapshot else "no snapshot was written"
        raise SolverError(f"Iteration {self.iter}: the weights are no longer finite, so this snapshot is not written "
                          f"({keep}). Lower base_lr or set clip_gradients.")

    def restore(self, path: str) -> None:
        """Resume from a solverstate (and its caffemodel), as Caffe's ``Solver::Restore``.

        Raises:
            SolverError: the history does not match the net, the process count differs, a file is missing.
            WeightsError: the caffemodel does not fit the net.
        """
        _log.info("Restoring previous solver status from %s", path)
        state: ResumeState = read_snapshot(path, self.dist.world_size)
        self._check_resume(state)
        self._announce_resume(state)
        if state.learned_net is not None:
            self.net.load_weights(state.learned_net)
        self.rule.load_history(state.history)
        self.iter = state.iter
        self.schedule.current_step = state.current_step
        if state.rng_states is not None:
            torch.set_rng_state(torch.frombuffer(bytearray(state.rng_states[self.dist.rank]), dtype=torch.uint8))
        if state.cuda_rng_states is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.frombuffer(bytearray(state.cuda_rng_states[self.dist.rank]),
                                                      dtype=torch.uint8), self.device)
        if state.data is not None:
            self._restore_data(state)
        elif state.shared_data is not None:
            self.net.load_data_state({name: state.shared_data for name in self.net.data_state()})
        elif state.world_size is None:
            _log.warning("%s was not written by slim: the data order restarts and random streams differ from the "
                         "run that wrote it.", path)
        if state.loss_scale is not None:
            self.precision.load_scaler_state(*state.loss_scale)
        self._losses.clear()
        self._losses.extend(state.smoothed_loss)
        self._timer = (time.monotonic(), self.iter)
        self.last_snapshot = os.fspath(path)
        self._snapshot_iter = self.iter
        if self.metrics is not None:
            self.metrics.truncate_from(self.iter)

    def _check_resume(self, state: ResumeState) -> None:
        """Check what a solverstate says against this solver before any of it is used (the file's own
        consistency was checked when it was read; history and data positions are checked as they are loaded)."""
        p, where = self.param, state.path
        if state.iter > p.max_iter:
            raise SolverError(f"{where} is at iteration {state.iter}, past max_iter {p.max_iter} of {self.source}; "
                              f"there is nothing left to train. Raise max_iter to continue training.")
        if p.lr_policy == "multistep" and state.current_step > len(p.stepvalue):
            raise SolverError(f"{where}: current_step is {state.current_step}, but {self.source} has "
                              f"{len(p.stepvalue)} stepvalue(s). Resume with the solver the snapshot was taken with.")
        if state.rng_states is not None:
            expected = torch.get_rng_state().numel()
            state_bytes = state.rng_states[self.dist.rank]
            problem = f"{len(state_bytes)} bytes, not {expected}" if len(state_bytes) != expected else None
            if problem is None:
                try:  # a generator of its own: the check leaves the global one untouched
                    torch.Generator().set_state(torch.frombuffer(bytearray(state_bytes), dtype=torch.uint8))
                except RuntimeError as e:
                    problem = str(e)
            if problem:
                raise SolverError(f"{where}: the random-number state of process {self.dist.rank} is not a state of "
                                  f"this torch's CPU generator ({problem}); the file is damaged. Resume from "
                                  f"another snapshot.")
        if state.cuda_rng_states is not None and self.device.type == "cuda":
            expected = torch.cuda.get_rng_state(self.device).numel()
            if len(state.cuda_rng_states[self.dist.rank]) != expected:
                raise SolverError(f"{where}: the CUDA random-number state of process {self.dist.rank} holds "
                                  f"{len(state.cuda_rng_states[self.dist.rank])} bytes, not {expected}; the file is "
                                  f"damaged or from another CUDA generator. Resume from another snapshot.")

    def _announce_resume(self, state: ResumeState) -> None:
        """Say which snapshot pair is resumed from, and which newer weights are not used and why."""
        if state.learned_net is not None:
            _log.info("Resuming at iteration %d from %s with its weights %s", state.iter, state.path,
                      state.learned_net)
        else:
            _log.warning("Resuming at iteration %d from %s, which names no weights file (learned_net): the net keeps "
                         "the weights it was built with.", state.iter, state.path)
        if self.dist.is_root and self.param.snapshot_prefix:
            for model in unpaired_caffemodels(self.param.snapshot_prefix, after=state.iter):
                _log.warning("%s is newer than the snapshot resumed from but has no .solverstate: that snapshot was "
                             "interrupted while it was written, so it cannot be resumed from and is not used (its "
                             "weights can still seed a run with --weights).", model)

    def _data_nets(self) -> dict:
        """The nets whose data positions a snapshot keeps: None -> the train net, i -> test net i."""
        return {None: self.net, **dict(enumerate(self.test_nets))}

    def _restore_data(self, state: ResumeState) -> None:
        """Put every data layer back where the snapshot says; a layer it does not know starts afresh, with a
        warning (the net was edited)."""
        for key, net in self._data_nets().items():
            saved = {d.layer: (d.epoch, d.position) for d in state.data if d.test_net == key}
            missing = sorted(set(net.data_state()) - set(saved))
            if missing:
                which = "the train net" if key is None else f"test net {key}"
                _log.warning("%s has no data position for layer(s) %s of %s; they start from the beginning of "
                             "their data.", state.path, ", ".join(missing), which)
            net.load_data_state(saved)


class _Deferred(Exception):
    """Skips an iteration's work on the process that must share a failure it had before."""


class _CompiledForward:
    """The train net's forward through ``torch.compile``, given up for eager at the first failure, with one warning.

    The batch is read eagerly (``Net.next_batch``: random transforms and file reads would break the graph into
    per-layer pieces) and its labels checked, then the compiled net runs on it as one graph. Shapes are static
    (``dynamic=False``): a Caffe net's batches keep their size, and dynamic-shape kernels were where a compiled
    backward failed (ResNet-20 on CPU, a value-range error in convolution_backward after a recompile). A failing
    forward is run again eagerly here on the same batch; a failing backward is caught by Solver._passes, which runs
    the iteration again.
    """

    def __init__(self, net, iteration: Callable[[], int]) -> None:
        self.net = net
        self.iteration = iteration
        self.compiled = torch.compile(net, dynamic=False)
        self.gave_up = False

    def give_up(self, error: BaseException) -> None:
        """Use the eager net from now on, saying why once."""
        if not self.gave_up:
            warnings.warn(f"torch.compile failed on the train net at iteration {self.iteration()} "
                          f"({type(error).__name__}: {error}); training continues without --compile.", stacklevel=3)
        self.gave_up = True
        self.compiled = self.net

    def __call__(self):
        batch = self.net.next_batch()
        if self.gave_up:
            return self.net(**batch)
        self.net.check_labels(batch)
        try:
            return self.compiled(**batch)
        except SlimError:
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            self.give_up(e)
            return self.net(**batch)
