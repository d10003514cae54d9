"""Caffe's update rules and ApplyUpdate order against hand computation (REFERENCE §2.1 step 8, §2.2)."""


import numpy as np
import pytest
import torch

from slim import proto as pb
from slim.errors import SolverError
from slim.net import LearnableParam as Param
from slim.solver import RULES, LrSchedule, create_rule

SHAPES = [(4, 3, 3, 3), (4,), (4,)]     # a conv weight, its bias, a scale
LR_MULTS = [1.0, 2.0, 0.5]
DECAY_MULTS = [1.0, 0.0, 2.0]

# Solver fields per rule, as the BVLC examples set them.
RULE_FIELDS = {
    "SGD": dict(momentum=0.9),
    "Nesterov": dict(momentum=0.9),
    "AdaGrad": dict(),
    "RMSProp": dict(rms_decay=0.98),
    "AdaDelta": dict(momentum=0.95, delta=1e-6),
    "Adam": dict(momentum=0.9, momentum2=0.999),
}


def make_params(seed=0, shapes=SHAPES, lr_mults=LR_MULTS, decay_mults=DECAY_MULTS):
    rng = np.random.default_rng(seed)
    names = [("conv1", 0), ("conv1", 1), ("scale1", 0)]
    return [Param(n, i, torch.nn.Parameter(torch.tensor(rng.standard_normal(s), dtype=torch.float32)), lm, dm)
            for (n, i), s, lm, dm in zip(names, shapes, lr_mults, decay_mults)]


def grad_fn(ws, it, iter_size):
    """A gradient that depends on the weights (so the trajectory matters): the sum over iter_size passes."""
    out = []
    for j, w in enumerate(ws):
        g = np.zeros_like(w)
        for k in range(iter_size):
            phase = np.arange(w.size).reshape(w.shape) * 0.37 + it * 1.3 + k * 0.7 + j
            g = g + (0.5 * w - np.sin(phase)) * (1 + 0.2 * k)
        out.append(g)
    return out


def reference(rule, solver, ws, rates, iter_size):
    """ApplyUpdate written from the formulas, in float64 numpy; returns the weights after each update."""
    f = solver
    n = len(ws)
    hist = [np.zeros_like(w) for w in ws] * (2 if rule in ("AdaDelta", "Adam") else 1)
    hist = [h.copy() for h in hist]
    trajectory = []
    for it, rate in enumerate(rates):
        gs = grad_fn(ws, it, iter_size)
        if f.clip_gradients >= 0:
            l2 = np.sqrt(sum((g ** 2).sum() for g in gs))
            if l2 > f.clip_gradients:
                gs = [g * f.clip_gradients / l2 for g in gs]
        new = []
        for i, (w, g) in enumerate(zip(ws, gs)):
            g = g / iter_size
            decay = f.weight_decay * DECAY_MULTS[i]
            g = g + decay * (w if f.regularization_type == "L2" else np.sign(w))
            lr = rate * LR_MULTS[i]
            m = f.momentum
            if rule == "SGD":
                hist[i] = m * hist[i] + lr * g
                diff = hist[i]
            elif rule == "Nesterov":
                old = hist[i]
                hist[i] = m * hist[i] + lr * g
                diff = (1 + m) * hist[i] - m * old
            elif rule == "AdaGrad":
                hist[i] = hist[i] + g ** 2
                diff = lr * g / (np.sqrt(hist[i]) + f.delta)
            elif rule == "RMSProp":
                d = f.rms_decay
                hist[i] = d * hist[i] + (1 - d) * g ** 2
                diff = lr * g / (np.sqrt(hist[i]) + f.delta)
            elif rule == "AdaDelta":
                hist[i] = m * hist[i] + (1 - m) * g ** 2
                u = g * np.sqrt((hist[n + i] + f.delta) / (hist[i] + f.delta))
                hist[n + i] = m * hist[n + i] + (1 - m) * u ** 2
                diff = lr * u
            elif rule == "Adam":
                b1, b2, t = f.momentum, f.momentum2, it + 1
                hist[i] = b1 * hist[i] + (1 - b1) * g
                hist[n + i] = b2 * hist[n + i] + (1 - b2) * g ** 2
                diff = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * hist[i] / (np.sqrt(hist[n + i]) + f.delta)
            new.append(w - diff)
        ws = new
        trajectory.append(ws)
    return trajectory, hist


def run_rule(rule, solver, params, rates, iter_size, start=0):
    r = create_rule(solver, params)
    trajectory = []
    for it, rate in enumerate(rates, start):
        ws = [p.tensor.detach().double().numpy() for p in params]
        for p, g in zip(params, grad_fn(ws, it, iter_size)):
            p.tensor.grad = torch.tensor(g, dtype=torch.float32)
        r.apply_update(rate, it)
        trajectory.append([p.tensor.detach().double().numpy().copy() for p in params])
    return r, trajectory


def make_solver(rule, **extra):
    s = pb.SolverParameter(type=rule, base_lr=0.1, lr_policy="multistep", gamma=0.1, stepvalue=[2, 4],
                           weight_decay=5e-3, **RULE_FIELDS[rule])
    for k, v in extra.items():
        setattr(s, k, v)
    return s


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("regularization, iter_size, clip", [("L2", 1, -1.0), ("L1", 1, -1.0), ("L2", 3, 15.0)])
def test_rule_matches_hand_computation(rule, regularization, iter_size, clip):
    solver = make_solver(rule, regularization_type=regularization, iter_size=iter_size, clip_gradients=clip)
    sched = LrSchedule(solver, "s")
    rates = [sched.rate(it) for it in range(6)]   # 0.1, 0.1, 0.01, 0.01, 0.001, 0.001
    assert rates[1] != rates[2] != rates[4]
    params = make_params()
    w0 = [p.tensor.detach().double().numpy().copy() for p in params]
    expected, expected_hist = reference(rule, solver, w0, rates, iter_size)
    r, got = run_rule(rule, solver, params, rates, iter_size)
    for it, (e_ws, g_ws) in enumerate(zip(expected, got)):
        for e, g in zip(e_ws, g_ws):
            np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6, err_msg=f"{rule} after update {it + 1}")
    assert len(r.history) == len(expected_hist)
    for e, h in zip(expected_hist, r.history):
        np.testing.assert_allclose(h.double().numpy(), e, rtol=2e-5, atol=1e-7)
    if clip >= 0:
        # The case is meant to clip the summed gradient while its 1/iter_size normalised norm is below clip.
        for it, ws in enumerate([w0] + expected[:-1]):
            norm = np.sqrt(sum((g ** 2).sum() for g in grad_fn(ws, it, iter_size)))
            assert norm > clip > norm / iter_size


@pytest.mark.parametrize("rule", sorted(RULES))
def test_history_count_order_and_zero_start(rule):
    params = make_params()
    r = create_rule(make_solver(rule), params)
    per = 2 if rule in ("AdaDelta", "Adam") else 1
    assert r.history_per_param == per and len(r.history) == per * len(params)
    for k, h in enumerate(r.history):
        assert h.shape == params[k % len(params)].tensor.shape and not h.any()


def test_adam_history_is_all_m_then_all_v():
    params = make_params()
    solver = make_solver("Adam", weight_decay=0.0)
    r = create_rule(solver, params)
    grads = [torch.full(p.tensor.shape, 2.0) for p in params]
    for p, g in zip(params, grads):
        p.tensor.grad = g.clone()
    r.apply_update(0.01, 0)
    n = len(params)
    b1, b2 = solver.momentum, solver.momentum2
    for i in range(n):
        torch.testing.assert_close(r.history[i], torch.full(params[i].tensor.shape, (1 - b1) * 2.0))
        torch.testing.assert_close(r.history[n + i], torch.full(params[i].tensor.shape, (1 - b2) * 4.0))


def test_load_history_resumes_exactly():
    solver = make_solver("Adam")
    sched = LrSchedule(solver, "s")
    rates = [sched.rate(it) for it in range(6)]
    full_params = make_params()
    _, full = run_rule("Adam", solver, full_params, rates, 1)
    first_params = make_params()
    first, _ = run_rule("Adam", solver, first_params, rates[:3], 1)
    # Resume: fresh params carrying the snapshot's weights, fresh rule, history loaded from numpy arrays.
    resumed_params = make_params()
    with torch.no_grad():
        for p, q in zip(resumed_params, first_params):
            p.tensor.copy_(q.tensor)
    saved = [h.numpy().copy() for h in first.history]
    saved[1] = saved[1].reshape(1, 1, 1, 4)          # legacy 4-D form of a bias history blob is accepted
    r = create_rule(solver, resumed_params)
    objects = [id(h) for h in r.history]
    r.load_history(saved)
    assert [id(h) for h in r.history] == objects     # restored in place
    for it in range(3, 6):
        ws = [p.tensor.detach().double().numpy() for p in resumed_params]
        for p, g in zip(resumed_params, grad_fn(ws, it, 1)):
            p.tensor.grad = torch.tensor(g, dtype=torch.float32)
        r.apply_update(rates[it], it)
    for p, e in zip(resumed_params, full[-1]):
        np.testing.assert_array_equal(p.tensor.detach().double().numpy(), e)


def test_load_history_refuses_a_mismatched_snapshot():
    params = make_params()
    r = create_rule(make_solver("Adam"), params)
    good = [h.numpy() for h in r.history]
    with pytest.raises(SolverError, match=r"does not match the net.*keeps 6 history blobs.*has 3"):
        r.load_history(good[:3])
    bad = list(good)
    bad[3] = np.zeros((4, 3, 3, 2), np.float32)
    with pytest.raises(SolverError) as err:
        r.load_history(bad)
    message = str(err.value)
    assert "conv1[0]" in message and "(4, 3, 3, 3)" in message and "(4, 3, 3, 2)" in message
    assert "second history" in message


def test_sgd_equals_torch_sgd_at_constant_rate_and_differs_after_a_change_as_caffe_says():
    lr1, lr2, mu, wd = 0.1, 0.01, 0.9, 5e-4
    solver = pb.SolverParameter(type="SGD", momentum=mu, weight_decay=wd)
    lr1, lr2, mu, wd = (float(np.float32(x)) for x in (lr1, lr2, mu, wd))
    ours = make_params(lr_mults=[1.0] * 3, decay_mults=[1.0] * 3)
    theirs = make_params(lr_mults=[1.0] * 3, decay_mults=[1.0] * 3)
    rule = create_rule(solver, ours)
    opt = torch.optim.SGD([p.tensor for p in theirs], lr=lr1, momentum=mu, weight_decay=wd)

    def step(it, rate):
        for params in (ours, theirs):
            ws = [p.tensor.detach().double().numpy() for p in params]
            for p, g in zip(params, grad_fn(ws, it, 1)):
                p.tensor.grad = torch.tensor(g, dtype=torch.float32)
        rule.apply_update(rate, it)
        for group in opt.param_groups:
            group["lr"] = rate
        opt.step()

    for it in range(5):
        step(it, lr1)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.tensor, q.tensor, rtol=1e-5, atol=1e-6)
    # Just before the change both hold the same weights and Caffe's history is lr1 * torch's momentum buffer.
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            q.tensor.copy_(p.tensor)
    buffers = [opt.state[q.tensor]["momentum_buffer"].clone() for q in theirs]
    for h, b in zip(rule.history, buffers):
        torch.testing.assert_close(h, lr1 * b, rtol=1e-5, atol=1e-7)
    step(5, lr2)
    # Caffe: w - (mu*v + lr2*g); torch: w - lr2*(mu*b + g); with v = lr1*b they differ by -mu*(lr1 - lr2)*b.
    for p, q, b in zip(ours, theirs, buffers):
        diff = p.tensor.detach() - q.tensor.detach()
        torch.testing.assert_close(diff, -mu * (lr1 - lr2) * b, rtol=1e-3, atol=1e-6)
        assert diff.abs().max() > 1e-3


def test_clip_uses_the_summed_gradient_before_iter_size_normalisation():
    p = Param("ip", 0, torch.nn.Parameter(torch.zeros(2)))
    r = create_rule(pb.SolverParameter(type="SGD", clip_gradients=4.0, iter_size=2), [p])
    p.tensor.grad = torch.tensor([3.0, 4.0])          # summed over 2 passes: norm 5 > 4; normalised 2.5 < 4
    r.apply_update(1.0, 0)
    torch.testing.assert_close(p.tensor.detach(), -torch.tensor([3.0, 4.0]) * 4 / 5 / 2)


def test_clip_is_global_over_all_params():
    a, b = Param("a", 0, torch.nn.Parameter(torch.zeros(1))), Param("b", 0, torch.nn.Parameter(torch.zeros(1)))
    r = create_rule(pb.SolverParameter(type="SGD", clip_gradients=1.0), [a, b])
    a.tensor.grad, b.tensor.grad = torch.tensor([3.0]), torch.tensor([4.0])
    r.apply_update(1.0, 0)
    torch.testing.assert_close(torch.cat([a.tensor.detach(), b.tensor.detach()]), -torch.tensor([0.6, 0.8]))


def test_l1_decay_adds_sign_and_decay_mult_lr_mult_scale_it():
    w = [-2.0, 0.0, 3.0]
    ps = [Param("s", 0, torch.nn.Parameter(torch.tensor(w)), lr_mult=1.0, decay_mult=1.0),
          Param("s", 1, torch.nn.Parameter(torch.tensor(w)), lr_mult=2.0, decay_mult=3.0),
          Param("t", 0, torch.nn.Parameter(torch.tensor(w)), lr_mult=0.0, decay_mult=1.0)]
    r = create_rule(pb.SolverParameter(type="SGD", weight_decay=0.125, regularization_type="L1"), ps)
    for p in ps:
        p.tensor.grad = torch.zeros(3)
    r.apply_update(0.5, 0)
    sign = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(ps[0].tensor.detach(), torch.tensor(w) - 0.5 * 0.125 * sign)
    torch.testing.assert_close(ps[1].tensor.detach(), torch.tensor(w) - 0.5 * 2 * 0.125 * 3 * sign)
    torch.testing.assert_close(ps[2].tensor.detach(), torch.tensor(w))     # lr_mult 0: frozen


def test_param_without_gradient_still_decays_like_caffe():
    p = Param("unused", 0, torch.nn.Parameter(torch.tensor([1.0, -2.0])))
    r = create_rule(pb.SolverParameter(type="SGD", weight_decay=0.5, momentum=0.5), [p])
    assert p.tensor.grad is None
    r.apply_update(0.25, 0)
    torch.testing.assert_close(p.tensor.detach(), torch.tensor([1.0, -2.0]) * (1 - 0.25 * 0.5))


def test_rate_is_rounded_to_float32_as_caffe_dtype():
    p = Param("ip", 0, torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)))
    r = create_rule(pb.SolverParameter(type="SGD"), [p])
    p.tensor.grad = torch.ones(1, dtype=torch.float64)
    r.apply_update(0.1, 0)                             # float64 weights expose the scalar actually used
    assert -p.tensor.item() == float(np.float32(0.1)) != 0.1


@pytest.mark.parametrize("fields, needle", [
    (dict(type="AdaGrad", momentum=0.9), "momentum cannot be used with AdaGrad"),
    (dict(type="RMSProp", momentum=0.9), "momentum cannot be used with RMSProp"),
    (dict(type="RMSProp", rms_decay=1.0), "0 <= rms_decay < 1"),
    (dict(type="RMSProp", rms_decay=-0.1), "0 <= rms_decay < 1"),
    (dict(type="Momentum"), "known types are SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam"),
    (dict(type="adam"), "did you mean \"Adam\""),
    (dict(type="SGD", regularization_type="l2", weight_decay=0.1), "regularization_type \"l2\""),
    (dict(type="SGD", iter_size=0), "iter_size"),
    (dict(solver_type=pb.SolverParameter.ADAM), "solver_type"),
])
def test_invalid_rules_are_refused(fields, needle):
    with pytest.raises(SolverError) as err:
        create_rule(pb.SolverParameter(**fields), make_params(), "s.prototxt")
    assert str(err.value).startswith("s.prototxt: ") and needle in str(err.value)


def test_every_registered_rule_trains_without_nans():
    for name in RULES:
        params = make_params()
        r = create_rule(make_solver(name), params)
        assert r.type == name == type(r).__name__ and repr(r).startswith(name)
        before = [p.tensor.detach().clone() for p in params]
        run = run_rule(name, make_solver(name), params, [0.1] * 3, 1)[1]
        assert all(torch.isfinite(torch.tensor(w)).all() for ws in run for w in ws)
        assert all(not torch.equal(b, p.tensor.detach()) for b, p in zip(before, params))


@pytest.mark.parametrize("rule", ["SGD", "Adam"])
def test_chunking_does_not_change_the_result(rule, monkeypatch):
    import slim.solver.rules as rules

    def trajectory(chunk_numel):
        monkeypatch.setattr(rules, "_CPU_CHUNK_NUMEL", chunk_numel)
        params = make_params(lr_mults=[1.0, 2.0, 1.0], decay_mults=[1.0, 0.0, 1.0])   # groups interleave
        r, run = run_rule(rule, make_solver(rule, clip_gradients=20.0), params, [0.1, 0.1, 0.01], 2)
        return r, run

    whole, one = trajectory(1 << 40)
    split, many = trajectory(1)
    assert len(whole._chunks) == 2 and len(split._chunks) == 3
    for a, b in zip(one, many):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_nesterov_equals_torch_nesterov_at_constant_rate():
    lr, mu, wd = (float(np.float32(x)) for x in (0.05, 0.9, 1e-3))
    ours, theirs = make_params(decay_mults=[1.0] * 3, lr_mults=[1.0] * 3), make_params()
    rule = create_rule(pb.SolverParameter(type="Nesterov", momentum=mu, weight_decay=wd), ours)
    opt = torch.optim.SGD([p.tensor for p in theirs], lr=lr, momentum=mu, weight_decay=wd, nesterov=True)
    for it in range(6):
        for params in (ours, theirs):
            ws = [p.tensor.detach().double().numpy() for p in params]
            for p, g in zip(params, grad_fn(ws, it, 1)):
                p.tensor.grad = torch.tensor(g, dtype=torch.float32)
        rule.apply_update(lr, it)
        opt.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.tensor, q.tensor, rtol=1e-5, atol=1e-6)


def test_unknown_regularization_type_without_decay_runs_as_caffe():
    # Caffe reads regularization_type only for a param whose weight_decay * decay_mult is non-zero.
    params = make_params(decay_mults=[0.0, 0.0, 0.0])
    with pytest.warns(UserWarning, match="regularization_type \"l2\" is unknown, but no param is decayed"):
        r = create_rule(pb.SolverParameter(type="SGD", weight_decay=0.5, regularization_type="l2"), params, "s.prototxt")
    for p in params:
        p.tensor.grad = torch.ones_like(p.tensor)
    before = [p.tensor.detach().clone() for p in params]
    r.apply_update(0.25, 0)
    for b, p in zip(before, params):                   # plain SGD step, no decay term
        assert torch.allclose(p.tensor.detach(), b - 0.25 * p.lr_mult, rtol=0, atol=1e-6)
    with pytest.raises(SolverError, match="regularization_type \"l2\" is unknown"):
        create_rule(pb.SolverParameter(type="SGD", weight_decay=0.5, regularization_type="l2"),
                    make_params(decay_mults=[0.0, 1.0, 0.0]), "s.prototxt")
