"""slim.caffe solvers: steps equal slim's own Solver (sparsity penalty included), snapshots and restore, the manual
forward/backward/apply_update loop, callbacks, and the solver classes' choice of update rule."""

import numpy as np
import pytest
import torch

import slim.caffe as caffe
from slim import proto as pb
from slim.errors import NetError, SolverError
from slim.io import read_solver, write_solver
from slim.solver import Solver as SlimSolver

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def solver_file(tmp_path, name="solver.prototxt", **fields):
    """The demo's sparse solver on the built-in digits, shortened: no tests, no display, snapshots in tmp_path."""
    p = read_solver(str(ROOT / "solvers" / "demo_digits_sparse.prototxt"))
    p.net = str(ROOT / "nets" / "demo_digits.prototxt")
    p.max_iter = 4
    p.display = 0
    p.test_interval = 0
    del p.test_iter[:]
    p.snapshot = 0
    p.snapshot_after_train = False
    p.snapshot_prefix = str(tmp_path / "snap")
    for key, value in fields.items():
        if key == "penalty":
            p.sparsity.penalty = value
        else:
            setattr(p, key, value)
    path = tmp_path / name
    write_solver(p, str(path))
    return str(path)


def weights(params):
    return {(name, i): t.detach().clone() for name, ts in params.items() for i, t in enumerate(ts)}


def assert_same_weights(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")


def test_steps_equal_slims_solver_with_the_sparsity_penalty(tmp_path):
    path = solver_file(tmp_path)
    pycaffe = caffe.SGDSolver(path)
    pycaffe.step(3)
    ours = SlimSolver(path, metrics=False)
    ours.step(3)
    assert pycaffe.iter == ours.iter == 3
    assert_same_weights(weights(pycaffe.net.slim_net.params), weights(ours.net.params))
    assert float(pycaffe.net.blobs["loss"].data) == pytest.approx(ours.loss, rel=1e-5)
    # The penalty acted: the scaling factors differ from a run without it.
    plain = SlimSolver(solver_file(tmp_path, "plain.prototxt", penalty=0.0), metrics=False)
    plain.step(3)
    gamma = pycaffe.net.params["conv1_1/scale"][0].data
    assert np.abs(gamma - plain.net.params["conv1_1/scale"][0].detach().numpy()).max() > 1e-4
    np.testing.assert_allclose(gamma, ours.net.params["conv1_1/scale"][0].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_blobs_after_a_step_hold_its_last_pass(tmp_path):
    s = caffe.SGDSolver(solver_file(tmp_path))
    s.step(1)
    net = s.net
    assert float(net.blobs["loss"].data) == pytest.approx(s.slim_solver.loss, rel=1e-6)
    assert net.blobs["data"].data.shape == (64, 1, 8, 8) and net.blobs["data"].data.any()
    assert net.blobs["fc"].diff.any()                 # the backward of the step filled the diffs
    labels = net.blobs["label"].data
    assert set(np.unique(labels)) <= set(range(10))


def test_manual_forward_backward_apply_update_equals_step(tmp_path):
    path = solver_file(tmp_path, lr_policy="fixed", penalty=0.01)
    stepped = caffe.SGDSolver(path)
    stepped.step(3)
    manual = caffe.SGDSolver(path)
    for _ in range(3):                                # pycaffe's hand-written training loop
        manual.net.clear_param_diffs()
        manual.net.forward()
        manual.net.backward()
        manual.apply_update()
    assert manual.iter == 0                           # apply_update does not advance iter, as in Caffe
    assert_same_weights(weights(manual.net.slim_net.params), weights(stepped.net.slim_net.params))


def test_param_diff_edits_before_apply_update_take_effect(tmp_path):
    s = caffe.SGDSolver(solver_file(tmp_path, lr_policy="fixed", momentum=0.0, weight_decay=0.0, penalty=0.0))
    before = s.net.params["fc"][1].data.copy()
    s.net.clear_param_diffs()
    s.net.params["fc"][1].diff[...] = 1.0             # a gradient written by hand
    s.apply_update()
    lr_mult = s.net.slim_net.graph.layer("fc").blob_specs[1].lr_mult
    np.testing.assert_allclose(s.net.params["fc"][1].data, before - np.float32(0.1) * lr_mult, rtol=1e-6)


def test_snapshot_and_restore(tmp_path):
    path = solver_file(tmp_path)
    a = caffe.SGDSolver(path)
    a.step(2)
    state = a.snapshot()
    assert state.endswith("snap_iter_2.solverstate")
    a.step(2)
    b = caffe.SGDSolver(path)
    b.restore(state)
    assert b.iter == 2
    b.step(2)
    assert_same_weights(weights(a.net.slim_net.params), weights(b.net.slim_net.params))
    c = caffe.SGDSolver(path)
    c.solve(state)                                    # Solve(resume_file) restores, then trains to max_iter
    assert c.iter == 4
    assert_same_weights(weights(a.net.slim_net.params), weights(c.net.slim_net.params))


def test_callbacks_run_at_start_and_when_gradients_are_ready(tmp_path):
    s = caffe.SGDSolver(solver_file(tmp_path))
    calls = []
    s.add_callback(lambda: calls.append(("start", s.iter)),
                   lambda: calls.append(("gradients", s.iter, bool(s.net.params["fc"][0].diff.any()))))
    s.step(2)
    assert calls == [("start", 0), ("gradients", 0, True), ("start", 1), ("gradients", 1, True)]
    with pytest.raises(SolverError, match="two callables"):
        s.add_callback(object(), None)


def test_solver_classes_choose_the_rule(tmp_path):
    path = solver_file(tmp_path, type="Adam", momentum=0.9)
    with pytest.warns(UserWarning, match="runs \"SGD\""):
        sgd = caffe.SGDSolver(path)
    assert sgd.param.type == "SGD" and len(sgd.slim_solver.rule.history) == len(sgd.net.slim_net.learnable_params)
    adam = caffe.get_solver(path)
    assert isinstance(adam, caffe.AdamSolver) and adam.param.type == "Adam"
    assert len(adam.slim_solver.rule.history) == 2 * len(adam.net.slim_net.learnable_params)
    bad = tmp_path / "bad.prototxt"
    bad.write_text(open(path).read().replace('type: "Adam"', 'type: "Momentum"'))
    with pytest.raises(SolverError, match="known types are SGD"):
        caffe.get_solver(str(bad))


def test_test_nets_share_the_train_weights(tmp_path):
    path = solver_file(tmp_path, test_interval=100)
    p = read_solver(path)
    p.test_iter.append(1)
    write_solver(p, path)
    s = caffe.SGDSolver(path)
    assert len(s.test_nets) == 1
    s.step(1)
    np.testing.assert_array_equal(s.test_nets[0].params["fc"][0].data, s.net.params["fc"][0].data)
    out = s.test_nets[0].forward()
    assert set(out) == {"accuracy", "loss"} and 0 <= float(out["accuracy"]) <= 1
    assert s.test_nets[0].blobs["data"].shape[0] == 120
    ev = s.slim_solver.test(0)                        # a test the solver runs leaves its batch in the blobs
    test_net = s.test_nets[0]
    assert float(test_net.blobs["loss"].data) == pytest.approx(ev.loss, rel=1e-5)      # test_iter 1: that batch
    with pytest.raises(NetError, match="no forward to go back through"):
        test_net.backward()                           # the solver's test keeps nothing for backward
    test_net.forward()
    test_net.backward()
    assert test_net.params["fc"][0].diff.any()


def test_a_solver_message_type_field(tmp_path):
    # caffe_pb2 is slim's schema: a SolverParameter made through it is what slim reads.
    from slim.caffe.proto import caffe_pb2
    assert caffe_pb2.SolverParameter is pb.SolverParameter and caffe_pb2.TRAIN == caffe.TRAIN == 0


def test_param_diffs_after_a_step_hold_the_step_taken(tmp_path):
    # Caffe's ComputeUpdateValue writes the update into each param's diff, and Net::Update subtracts it.
    s = caffe.SGDSolver(solver_file(tmp_path))
    s.step(1)
    before = {k: [b.data.copy() for b in v] for k, v in s.net.params.items()}
    s.step(1)
    for name, blobs in s.net.params.items():
        for i, blob in enumerate(blobs):
            if s.net.slim_net.graph.layer(name).blob_specs[i].lr_mult:
                np.testing.assert_allclose(blob.diff, before[name][i] - blob.data, rtol=1e-4, atol=1e-7)
