"""Caffe's learning-rate policies against hand computation (REFERENCE §2.3)."""

import math

import numpy as np
import pytest

from slim import proto as pb
from slim.errors import SolverError
from slim.solver import LR_POLICIES, LrSchedule


def f32(x):
    """The float32 value a proto float field holds."""
    return float(np.float32(x))


def schedule(**fields):
    return LrSchedule(pb.SolverParameter(**fields), "s.prototxt")


def test_fixed():
    s = schedule(base_lr=0.01, lr_policy="fixed")
    assert [s.rate(i) for i in (0, 1, 1000)] == [f32(0.01)] * 3


def test_step_changes_every_stepsize_and_sets_current_step():
    s = schedule(base_lr=0.1, lr_policy="step", gamma=0.1, stepsize=3)
    for it in range(10):
        k = it // 3
        assert s.rate(it) == pytest.approx(f32(0.1) * f32(0.1) ** k, rel=1e-15)
        assert s.current_step == k
    assert s.rate(6) == pytest.approx(0.001, rel=1e-6)
    # step overwrites whatever current_step a snapshot restored.
    s.current_step = 17
    assert s.rate(4) == pytest.approx(0.01, rel=1e-6) and s.current_step == 1


def test_exp():
    s = schedule(base_lr=0.5, lr_policy="exp", gamma=0.99)
    for it in (0, 1, 2, 50, 1000):
        assert s.rate(it) == pytest.approx(0.5 * f32(0.99) ** it, rel=1e-15)
    assert s.rate(2) == pytest.approx(0.5 * 0.99 * 0.99, rel=1e-6)


def test_inv_mnist_example():
    s = schedule(base_lr=0.01, lr_policy="inv", gamma=1e-4, power=0.75)
    assert s.rate(0) == f32(0.01)
    for it in (1, 100, 5000, 10000):
        assert s.rate(it) == pytest.approx(0.01 * (1 + 1e-4 * it) ** -0.75, rel=1e-6)
    assert s.rate(10000) == pytest.approx(0.01 * 2 ** -0.75, rel=1e-6)


def test_multistep_advances_in_order():
    s = schedule(base_lr=1.0, lr_policy="multistep", gamma=0.5, stepvalue=[3, 5])
    got = [(s.rate(it), s.current_step) for it in range(8)]
    assert got == [(1.0, 0)] * 3 + [(0.5, 1)] * 2 + [(0.25, 2)] * 3


def test_multistep_advances_at_most_one_step_per_call():
    s = schedule(base_lr=1.0, lr_policy="multistep", gamma=0.5, stepvalue=[3, 5, 7])
    # First call far past every step value (a run resumed without its current_step): one step per call.
    assert (s.rate(20), s.current_step) == (0.5, 1)
    assert (s.rate(21), s.current_step) == (0.25, 2)
    assert (s.rate(22), s.current_step) == (0.125, 3)
    assert (s.rate(23), s.current_step) == (0.125, 3)


def test_multistep_step_value_zero_applies_from_the_first_update():
    s = schedule(base_lr=1.0, lr_policy="multistep", gamma=0.1, stepvalue=[0, 2])
    assert s.rate(0) == pytest.approx(f32(0.1), rel=1e-15) and s.current_step == 1


def test_multistep_current_step_restore_matches_uninterrupted_run():
    fields = dict(base_lr=0.1, lr_policy="multistep", gamma=0.1, stepvalue=[2, 4, 6])
    full = schedule(**fields)
    rates = [full.rate(it) for it in range(9)]
    # Snapshot after 5 updates: current_step is saved; a fresh schedule restored from it continues identically.
    first = schedule(**fields)
    for it in range(5):
        first.rate(it)
    resumed = schedule(**fields)
    resumed.current_step = first.current_step
    assert resumed.current_step == 2
    assert [resumed.rate(it) for it in range(5, 9)] == rates[5:]
    assert rates[8] == pytest.approx(1e-4, rel=1e-6)


def test_poly():
    s = schedule(base_lr=0.1, lr_policy="poly", power=2.0, max_iter=100)
    assert s.rate(0) == f32(0.1)
    assert s.rate(50) == pytest.approx(f32(0.1) * 0.25, rel=1e-15)
    assert s.rate(75) == pytest.approx(0.1 * 0.25 ** 2, rel=1e-6)
    assert s.rate(100) == 0.0
    with pytest.raises(SolverError, match="max_iter"):
        s.rate(101)


def test_sigmoid():
    s = schedule(base_lr=0.1, lr_policy="sigmoid", gamma=0.1, stepsize=50)
    assert s.rate(50) == pytest.approx(0.05, rel=1e-7)
    for it in (0, 20, 80):
        assert s.rate(it) == pytest.approx(f32(0.1) / (1 + math.exp(-f32(0.1) * (it - 50))), rel=1e-15)
    assert s.rate(0) < s.rate(50) < s.rate(100)
    # A very negative exponent argument does not overflow: the rate is simply 0.
    steep = schedule(base_lr=0.1, lr_policy="sigmoid", gamma=1000.0, stepsize=10)
    assert steep.rate(0) == 0.0 and steep.rate(20) == pytest.approx(0.1, rel=1e-6)


def test_every_policy_has_a_working_example():
    examples = {
        "fixed": {}, "step": dict(gamma=0.1, stepsize=10), "exp": dict(gamma=0.9), "inv": dict(gamma=1e-3, power=1),
        "multistep": dict(gamma=0.1, stepvalue=[5]), "poly": dict(power=1, max_iter=20),
        "sigmoid": dict(gamma=0.5, stepsize=5),
    }
    assert set(examples) == set(LR_POLICIES)
    for policy, extra in examples.items():
        s = schedule(base_lr=0.1, lr_policy=policy, **extra)
        rates = [s.rate(it) for it in range(20)]
        assert all(math.isfinite(r) and r >= 0 for r in rates), policy
        assert policy in repr(s)


@pytest.mark.parametrize("fields, needle", [
    (dict(base_lr=0.1), "lr_policy is not set"),
    (dict(base_lr=0.1, lr_policy=""), "lr_policy is not set"),
    (dict(base_lr=0.1, lr_policy="cosine"), "cosine"),
    (dict(base_lr=0.1, lr_policy="Step", gamma=0.1, stepsize=3), "did you mean \"step\""),
    (dict(lr_policy="fixed"), "base_lr"),
    (dict(base_lr=0.1, lr_policy="step", gamma=0.1), "stepsize"),
    (dict(base_lr=0.1, lr_policy="step", gamma=0.1, stepsize=0), "stepsize > 0"),
    (dict(base_lr=0.1, lr_policy="step", gamma=-0.1, stepsize=10), "gamma >= 0"),
    (dict(base_lr=0.1, lr_policy="multistep", gamma=0.1), "stepvalue"),
    (dict(base_lr=0.1, lr_policy="multistep", gamma=0.1, stepvalue=[5, 5]), "strictly increasing"),
    (dict(base_lr=0.1, lr_policy="multistep", gamma=0.1, stepvalue=[10, 5]), "strictly increasing"),
    (dict(base_lr=0.1, lr_policy="poly", power=1.0), "max_iter"),
    (dict(base_lr=0.1, lr_policy="poly", power=1.0, max_iter=-5), "max_iter > 0"),
    (dict(base_lr=0.1, lr_policy="sigmoid", gamma=0.1), "stepsize"),
    (dict(base_lr=0.1, lr_policy="sigmoid", gamma=-0.1, stepsize=5), "gamma >= 0"),
])
def test_invalid_schedules_are_refused_up_front(fields, needle):
    with pytest.raises(SolverError) as err:
        schedule(**fields)
    message = str(err.value)
    assert message.startswith("s.prototxt: ") and needle in message


@pytest.mark.parametrize("fields, missing, rates", [
    # Caffe's implicit gamma = 0: base_lr * 0 ** floor(iter / stepsize), with 0 ** 0 = 1.
    (dict(lr_policy="step", stepsize=3), "gamma", {0: 0.1, 2: 0.1, 3: 0.0, 7: 0.0}),
    (dict(lr_policy="exp"), "gamma", {0: 0.1, 1: 0.0, 5: 0.0}),
    (dict(lr_policy="multistep", stepvalue=[2]), "gamma", {0: 0.1, 1: 0.1, 2: 0.0, 3: 0.0}),
    (dict(lr_policy="sigmoid", stepsize=4), "gamma", {0: 0.05, 4: 0.05, 9: 0.05}),
    # power = 0: (1 + gamma * iter) ** 0 and (1 - iter / max_iter) ** 0 are 1.
    (dict(lr_policy="inv", gamma=1e-2), "power", {0: 0.1, 50: 0.1}),
    (dict(lr_policy="poly", max_iter=10), "power", {0: 0.1, 9: 0.1}),
])
def test_unset_gamma_or_power_runs_as_caffe_with_a_warning(fields, missing, rates):
    with pytest.warns(UserWarning, match=f"reads {missing}, which is not set") as record:
        s = schedule(base_lr=0.1, **fields)
    assert "s.prototxt" in str(record[0].message)
    assert {i: s.rate(i) for i in sorted(rates)} == pytest.approx({i: f32(0.1) * r / 0.1 for i, r in rates.items()})
