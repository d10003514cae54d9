"""Snapshots, exact resumption, signals, divergence, and the errors that must come before training starts."""

import os
import signal

import numpy as np
import pytest
import torch

from slim.errors import DataError, SolverError
from slim.io import read_caffemodel, read_solverstate, write_solverstate
from slim.net import Net
from slim.solver import Hook, Solver
from slim.solver.signals import handle_signals
from solver_helpers import tiny_net, write_solver

RESUMABLE = dict(lr_policy="multistep", gamma=0.5, stepvalue=[3, 7], max_iter=12, average_loss=3, display=2,
                 test_iter=1, test_interval=4, snapshot_after_train=True)


class SendSignals(Hook):
    """Sends this process a signal at the start of given iterations (as a user's kill would)."""

    def __init__(self, at):
        self.at = at

    def before_step(self, solver):
        if solver.iter in self.at:
            os.kill(os.getpid(), self.at[solver.iter])


def run(path, hooks=(), **kwargs):
    solver = Solver(path, hooks=hooks, **kwargs)
    with handle_signals(solver):
        done = solver.solve()
    return solver, done


def blobs(path):
    return {layer.name: [np.array(b) for b in layer.blobs] for layer in read_caffemodel(path).layers if layer.blobs}


def test_a_run_stopped_by_sigint_and_resumed_ends_with_identical_weights(tmp_path):
    # Random crops and mirrors, Dropout, BatchNorm statistics, a multistep schedule and momentum: every piece of
    # state a resumption must restore.
    text = tiny_net(crop=6, mirror=True, dropout=0.3)
    full = write_solver(tmp_path, text, name="full", **RESUMABLE)
    run(full)
    parts = write_solver(tmp_path, text, name="parts", **RESUMABLE)
    # SIGHUP at iteration 2 snapshots after that update (iter 3) and goes on; SIGINT at 5 stops after it (iter 6),
    # where snapshot_after_train writes the snapshot to resume from.
    stopped, done = run(parts, hooks=[SendSignals({2: signal.SIGHUP, 5: signal.SIGINT})])
    assert not done and stopped.iter == 6
    assert sorted(p.name for p in tmp_path.glob("parts_iter_*.solverstate")) == [
        "parts_iter_3.solverstate", "parts_iter_6.solverstate"]
    resumed, done = run(parts, snapshot=str(tmp_path / "parts_iter_6.solverstate"))
    assert done and resumed.iter == 12
    a, b = blobs(tmp_path / "full_iter_12.caffemodel"), blobs(tmp_path / "parts_iter_12.caffemodel")
    assert a.keys() == b.keys() == {"conv", "bn", "scale", "ip"}
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert np.array_equal(x, y), name
    (sa, ha), (sb, hb) = (read_solverstate(tmp_path / f"{n}_iter_12.solverstate") for n in ("full", "parts"))
    assert all(np.array_equal(x, y) for x, y in zip(ha, hb)) and len(ha) == 8
    assert sa.current_step == sb.current_step == 2 and sa.iter == sb.iter == 12
    assert list(sa.slim_state.smoothed_loss) == list(sb.slim_state.smoothed_loss)
    # Every data layer's position, the test net's included: one batch of 60 test images at iterations 0, 4 and 8,
    # each test reading the next batch as in Caffe (the final snapshot comes before the final test, as in Caffe).
    positions = [(d.layer, d.test_net if d.HasField("test_net") else None, d.epoch, d.position)
                 for d in sa.slim_state.data]
    assert positions == [("data", None, 0, 12 * 16), ("data", 0, 0, 3 * 60)]
    assert list(sa.slim_state.data) == list(sb.slim_state.data) and not sa.slim_state.HasField("data_position")
    # The resumed run's metrics continue the stopped run's, with no iteration logged twice, and its tests saw the
    # same batches as the run that never stopped.
    import json
    records = {n: [json.loads(x) for x in (tmp_path / f"{n}.metrics.jsonl").read_text().splitlines()]
               for n in ("full", "parts")}
    train_iters = [r["iter"] for r in records["parts"] if r["kind"] == "train"]
    assert train_iters == [0, 2, 4, 6, 8, 10]
    tests = {n: [(r["iter"], r["outputs"]) for r in rs if r["kind"] == "test"] for n, rs in records.items()}
    assert tests["full"] == tests["parts"] and len(tests["full"]) == 4


# A second train data layer on the 360 test images, 40 at a time: its position differs from the first layer's.
EXTRA_DATA = """
layer { name: "extra" type: "SlimData" top: "xdata" top: "xlabel" include { phase: TRAIN }
  transform_param { scale: 0.0625 } slim_data_param { dataset: DIGITS batch_size: 40 train: false } }
layer { name: "xip" type: "InnerProduct" bottom: "xdata" top: "xip"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "xloss" type: "SoftmaxWithLoss" bottom: "xip" bottom: "xlabel" top: "xloss" include { phase: TRAIN } }
"""


def test_every_data_layer_resumes_at_its_own_position(tmp_path):
    text = tiny_net() + EXTRA_DATA
    fields = dict(max_iter=12, snapshot_after_train=True)
    run(write_solver(tmp_path, text, name="full", **fields))
    parts = write_solver(tmp_path, text, name="parts", **fields)
    stopped, done = run(parts, hooks=[SendSignals({5: signal.SIGINT})])
    assert not done and stopped.iter == 6
    state, _ = read_solverstate(tmp_path / "parts_iter_6.solverstate")
    assert {d.layer: (d.epoch, d.position) for d in state.slim_state.data} == {"data": (0, 96), "extra": (0, 240)}
    resumed, done = run(parts, snapshot=str(tmp_path / "parts_iter_6.solverstate"))
    assert done and resumed.net.data_state() == {"data": (0, 192), "extra": (1, 120)}
    a, b = blobs(tmp_path / "full_iter_12.caffemodel"), blobs(tmp_path / "parts_iter_12.caffemodel")
    assert a.keys() == b.keys() and "xip" in a
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert np.array_equal(x, y), name


def test_an_older_snapshot_with_one_data_position_resumes_every_layer_there(tmp_path):
    path = write_solver(tmp_path, tiny_net() + EXTRA_DATA, max_iter=3, snapshot=3)
    Solver(path, metrics=False).solve()
    state, history = read_solverstate(tmp_path / "solver_iter_3.solverstate")
    state.slim_state.ClearField("data")
    state.slim_state.data_epoch, state.slim_state.data_position = 0, 48
    write_solverstate(tmp_path / "old.solverstate", state, history)
    solver = Solver(path, snapshot=str(tmp_path / "old.solverstate"), metrics=False)
    assert solver.net.data_state() == {"data": (0, 48), "extra": (0, 48)}


def test_the_fp16_loss_scale_is_saved_and_restored(tmp_path):
    path = write_solver(tmp_path, tiny_net(), max_iter=2, snapshot=2)
    solver = Solver(path, amp="fp16", metrics=False)
    solver.step(1)
    solver.precision.load_scaler_state(1024.0, 1)  # as if the scale had backed off and grown once since
    solver.step(1)
    solver.snapshot()
    assert solver.precision.scaler_state() == (1024.0, 2)
    state, _ = read_solverstate(tmp_path / "solver_iter_2.solverstate")
    assert (state.slim_state.loss_scale, state.slim_state.loss_scale_growth) == (1024.0, 2)
    resumed = Solver(path, amp="fp16", snapshot=str(tmp_path / "solver_iter_2.solverstate"), metrics=False)
    assert resumed.precision.scaler_state() == (1024.0, 2)
    # A float32 run neither saves a scale nor minds one in the snapshot it resumes from.
    assert Solver(path, snapshot=str(tmp_path / "solver_iter_2.solverstate"), metrics=False).precision.scaler_state() \
        is None
    plain = Solver(path, metrics=False)
    plain.step(2)
    plain.snapshot()
    assert not read_solverstate(tmp_path / "solver_iter_2.solverstate")[0].slim_state.HasField("loss_scale")


def test_a_caffe_solverstate_without_slim_state_resumes(tmp_path):
    path = write_solver(tmp_path, tiny_net(), snapshot=2, max_iter=2)
    Solver(path, metrics=False).solve()
    state, history = read_solverstate(tmp_path / "solver_iter_2.solverstate")
    state.ClearField("slim_state")
    write_solverstate(tmp_path / "caffe.solverstate", state, history)
    solver = Solver(path, snapshot=str(tmp_path / "caffe.solverstate"), metrics=False)
    assert solver.iter == 2
    assert all(np.array_equal(h.numpy(), x) for h, x in zip(solver.rule.history, history))


@pytest.mark.parametrize("snapshot, caught", [(3, "the loss is not finite"), (1, "the weights are no longer finite")])
def test_divergence_stops_with_the_iteration_and_keeps_the_last_good_snapshot(tmp_path, snapshot, caught):
    # base_lr 1e6 makes the weights overflow after a few updates (after the 4th, with Caffe's unclamped
    # SoftmaxWithLoss gradient); the next loss is NaN. With a snapshot due at that iteration, the weight check
    # catches it first; otherwise (every 3) the loss check does.
    path = write_solver(tmp_path, tiny_net(bn=False), base_lr=1e6, momentum=0.0, snapshot=snapshot, max_iter=50,
                        snapshot_after_train=True)
    solver = Solver(path, metrics=False)
    with pytest.raises(SolverError, match=rf"^Iteration (\d+): {caught}") as e:
        solver.solve()
    stopped = int(str(e.value).split(":")[0].split()[1])
    assert stopped == solver.iter and 1 < stopped < 50
    written = sorted(int(p.stem.split("_iter_")[1]) for p in tmp_path.glob("solver_iter_*.caffemodel"))
    assert written and written == list(range(snapshot, stopped, snapshot))  # nothing at or after the divergence
    for it in written:  # every snapshot written holds finite weights
        assert all(np.isfinite(b).all() for layer in blobs(tmp_path / f"solver_iter_{it}.caffemodel").values()
                   for b in layer)
    assert f"solver_iter_{written[-1]}.solverstate, is kept" in str(e.value)


def test_weights_come_from_the_solver_unless_given_and_are_ignored_on_resume(tmp_path):
    text = tiny_net()
    for name, seed in (("a", 11), ("b", 12)):
        from slim.graph import build_graph
        from slim.io import parse_net
        Net(build_graph(parse_net(text), "TRAIN"), seed=seed).save(tmp_path / f"{name}.caffemodel")
    path = write_solver(tmp_path, text, weights=f"{tmp_path}/a.caffemodel", max_iter=1)

    def conv(solver):
        return solver.net.params["conv"][0].detach().numpy()

    assert np.array_equal(conv(Solver(path, metrics=False)), blobs(tmp_path / "a.caffemodel")["conv"][0])
    given = Solver(path, weights=[str(tmp_path / "b.caffemodel")], metrics=False)
    assert np.array_equal(conv(given), blobs(tmp_path / "b.caffemodel")["conv"][0])
    # Test nets see the train net's blobs (shared, not copied).
    assert given.test_nets == [] or given.test_nets[0].params["conv"][0] is given.net.params["conv"][0]


def _prepare(tmp_path, kind):
    """A (solver path, kwargs) that must fail in Solver(...) for ``kind``."""
    text = tiny_net()
    if kind == "no net":
        path = tmp_path / "s.prototxt"
        path.write_text('base_lr: 0.1 lr_policy: "fixed"')
        return path, {}
    if kind == "lr_policy":
        return write_solver(tmp_path, text, lr_policy="stepwise"), {}
    if kind == "type":
        return write_solver(tmp_path, text, type="sgd"), {}
    if kind == "weights and snapshot":
        return write_solver(tmp_path, text), dict(weights=["w.caffemodel"], snapshot="s.solverstate")
    if kind == "history":
        sgd = write_solver(tmp_path, text, name="sgd", max_iter=1, snapshot=1)
        Solver(sgd, metrics=False).solve()
        adam = write_solver(tmp_path, text, name="adam", type="Adam", momentum=0.9)
        return adam, dict(snapshot=str(tmp_path / "sgd_iter_1.solverstate"))
    if kind == "world size":
        one = write_solver(tmp_path, text, name="one", max_iter=1, snapshot=1)
        Solver(one, metrics=False).solve()
        state, history = read_solverstate(tmp_path / "one_iter_1.solverstate")
        state.slim_state.world_size = 2
        write_solverstate(tmp_path / "two.solverstate", state, history)
        return one, dict(snapshot=str(tmp_path / "two.solverstate"))
    if kind == "data":
        bad = text.replace("dataset: DIGITS batch_size: 16", 'dataset: CIFAR10 source: "no/such/cifar" batch_size: 16')
        return write_solver(tmp_path, bad), {}
    if kind == "prefix":
        return write_solver(tmp_path, text, snapshot=5, snapshot_prefix=str(tmp_path / "missing" / "run")), {}
    if kind == "no loss":
        return write_solver(tmp_path, text.replace('top: "loss" }', 'top: "loss" loss_weight: 0 }')), {}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, error, message", [
    ("no net", SolverError, "names no train net"),
    ("lr_policy", SolverError, 'lr_policy "stepwise" is not a learning-rate policy'),
    ("type", SolverError, 'solver type "sgd" is unknown.*did you mean "SGD"'),
    ("weights and snapshot", SolverError, "--weights and --snapshot were both given"),
    ("history", SolverError, "history does not match the net.*Adam rule keeps 16 history blobs"),
    ("world size", SolverError, "trained by 2 process\\(es\\) and cannot resume with 1"),
    ("data", DataError, "no/such/cifar"),
    ("prefix", SolverError, "does not exist. Create it"),
    ("no loss", SolverError, "has no loss"),
])
def test_bad_input_fails_before_training_with_a_clear_message(tmp_path, kind, error, message):
    path, kwargs = _prepare(tmp_path, kind)
    started = []

    class Started(Hook):
        def before_step(self, solver):
            started.append(solver.iter)

    with pytest.raises(error, match=message):
        Solver(path, hooks=[Started()], metrics=False, **kwargs).solve()
    assert started == []


def test_amp_bf16_and_fp16_train_on_the_cpu(tmp_path):
    path = write_solver(tmp_path, tiny_net(), max_iter=3)
    losses = {}
    for amp in (None, "bf16", "fp16"):
        solver = Solver(path, amp=amp, metrics=False)
        before = solver.net.params["ip"][0].detach().clone()
        solver.solve()
        assert not torch.equal(before, solver.net.params["ip"][0]) and np.isfinite(solver.loss)
        losses[amp] = solver.loss
    assert losses["bf16"] == pytest.approx(losses[None], rel=0.05)
    assert losses["fp16"] == pytest.approx(losses[None], rel=0.05)


def test_channels_last_gives_the_same_training(tmp_path):
    path = write_solver(tmp_path, tiny_net(), max_iter=3)
    a, b = Solver(path, metrics=False), Solver(path, channels_last=True, metrics=False)
    a.solve(), b.solve()
    assert b.net.params["conv"][0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a.net.params["conv"][0], b.net.params["conv"][0], rtol=1e-4, atol=1e-6)


def test_compile_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    def broken_compile(module, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    path = write_solver(tmp_path, tiny_net(), max_iter=3)
    eager = Solver(path, metrics=False)
    eager.solve()
    with pytest.warns(UserWarning, match="torch.compile failed.*no compiler here"):
        fallback = Solver(path, compile=True, metrics=False)
        fallback.solve()
    assert torch.equal(eager.net.params["ip"][0], fallback.net.params["ip"][0])  # no batch was lost


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("InductorError: ValueRangeError in convolution_backward (injected)")


def _compile_failing_at(call, where):
    """A stand-in for torch.compile: runs the module eagerly, and fails on its ``call``-th call, in the forward or
    in the backward of that call's loss (as a lazily compiled backward does)."""
    calls = []

    def compile_(module, **kwargs):
        assert kwargs.get("dynamic") is False  # a Caffe net's batches keep their size: static shapes

        def run(*args, **kw):
            calls.append(1)
            if len(calls) == call and where == "forward":
                raise RuntimeError("InductorError: recompile failed (injected)")
            out = module(*args, **kw)
            if len(calls) == call:
                out.loss = _FailingBackward.apply(out.loss)
            return out
        return run
    return compile_


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_compile_failing_at_any_step_falls_back_once_and_trains_as_eager(tmp_path, monkeypatch, where):
    # iter_size 2: the failure comes in the second pass of iteration 1, after the first pass has added gradients
    # and moved the BatchNorm statistics; the iteration must still equal the eager one exactly.
    path = write_solver(tmp_path, tiny_net(), max_iter=4, iter_size=2)
    eager = Solver(path, metrics=False)
    eager.solve()
    monkeypatch.setattr(torch, "compile", _compile_failing_at(4, where))
    with pytest.warns(UserWarning, match="torch.compile failed on the train net at iteration 1 .*injected") as caught:
        compiled = Solver(path, compile=True, metrics=False)
        compiled.solve()
    assert sum("torch.compile failed" in str(w.message) for w in caught) == 1
    for name, blobs in eager.net.params.items():
        for a, b in zip(blobs, compiled.net.params[name]):
            assert torch.equal(a, b), name       # weights and BatchNorm statistics
    assert compiled.loss == eager.loss
