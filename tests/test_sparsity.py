"""Network slimming's sparsity penalty (Liu et al. 2017) and the scaling-factor statistics."""

import math

import numpy as np
import pytest
import torch

from slim import proto as pb
from slim.errors import SolverError
from slim.net import LearnableParam as Param
from slim.solver import GammaStats, SparsityPenalty, create_rule, create_sparsity, gamma_stats


def solver_with(penalty=0.0, layers=(), **fields):
    s = pb.SolverParameter(type="SGD", **fields)
    s.sparsity.penalty = penalty
    s.sparsity.layer.extend(layers)
    return s


def test_hook_adds_penalty_times_sign_of_gamma():
    gamma = torch.nn.Parameter(torch.tensor([0.5, -0.25, 0.0]))
    gamma.grad = torch.ones(3)
    SparsityPenalty(0.125, {"scale1": gamma})()
    assert torch.equal(gamma.grad, torch.tensor([1.125, 0.875, 1.0]))
    other = torch.nn.Parameter(torch.tensor([-2.0]))
    SparsityPenalty(0.5, {"scale2": other})()         # a target without a gradient gets one
    assert torch.equal(other.grad, torch.tensor([-0.5]))


def test_penalty_follows_normalisation_and_goes_through_momentum():
    s, mu = 2.0 ** -7, 0.5
    gamma = torch.nn.Parameter(torch.tensor([0.5, -0.5, 0.0]))
    params = [Param("scale1", 0, gamma)]
    solver = solver_with(s, momentum=mu, iter_size=4)
    rule = create_rule(solver, params)
    penalty = create_sparsity(solver, params, {"scale1": gamma})
    sign = torch.tensor([1.0, -1.0, 0.0])
    w = gamma.detach().clone()
    h = torch.zeros(3)
    for it in range(3):
        gamma.grad = torch.zeros(3)                    # no data gradient: only the penalty moves gamma
        rule.apply_update(1.0, it, gradient_hooks=[penalty])
        h = mu * h + s * sign                          # not divided by iter_size; accumulated by momentum
        w = w - h
        assert torch.equal(gamma.detach(), w)
    assert torch.equal(rule.history[0], (s + mu * s + mu * mu * s) * sign)


def _linear_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.tensor([2.0, -1.5, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0])  # the last four features are irrelevant
    w = torch.nn.Parameter(torch.randn(8, generator=g) * 0.1)
    gamma = torch.nn.Parameter(torch.ones(8))          # a per-feature scale: the channel scaling factor
    return x, y, w, gamma


def _train(penalty, iters, rate=0.02, hooks=True):
    x, y, w, gamma = _linear_problem()
    params = [Param("ip", 0, w), Param("scale", 0, gamma)]
    solver = solver_with(penalty, momentum=0.9, weight_decay=1e-4)
    rule = create_rule(solver, params)
    sparsity = create_sparsity(solver, params, {"scale": gamma})
    trajectory = []
    for it in range(iters):
        w.grad = gamma.grad = None
        ((x @ (gamma * w) - y) ** 2).mean().backward()
        rule.apply_update(rate, it, gradient_hooks=[sparsity] if hooks else ())
        trajectory.append(torch.cat([w.detach(), gamma.detach()]))
    loss = ((x @ (gamma * w) - y) ** 2).mean().item()
    return torch.stack(trajectory), gamma.detach(), loss, sparsity


def test_penalty_zero_leaves_the_plain_trajectory_bit_for_bit():
    with_hook = _train(0.0, 50)[0]
    plain = _train(0.0, 50, hooks=False)[0]
    assert torch.equal(with_hook, plain)


def test_penalty_drives_irrelevant_gammas_to_zero():
    _, plain, plain_loss, _ = _train(0.0, 400)
    _, sparse, sparse_loss, sparsity = _train(2e-2, 400)
    assert plain[4:].abs().min() > 0.2                 # without the penalty nothing goes to zero
    assert sparse[4:].abs().max() < 1e-2               # with it the irrelevant features' gammas do
    assert sparse[:4].abs().min() > 0.3                # while the useful ones survive
    assert plain_loss < 1e-6 and sparse_loss < 1e-3
    stats = sparsity.stats()
    assert stats.count == 8 and stats.below_1e2 == 0.5


def test_matches_the_papers_recipe_at_constant_rate():
    """The paper's code: loss.backward(); grad.add_(s * sign(gamma)); torch.optim.SGD(momentum, wd).step()."""
    rate, s = 0.02, 1e-2
    _, ours, _, _ = _train(s, 30, rate=rate)
    x, y, w, gamma = _linear_problem()
    opt = torch.optim.SGD([w, gamma], lr=float(np.float32(rate)), momentum=float(np.float32(0.9)),
                          weight_decay=float(np.float32(1e-4)))
    for _ in range(30):
        opt.zero_grad()
        ((x @ (gamma * w) - y) ** 2).mean().backward()
        gamma.grad.add_(float(np.float32(s)) * torch.sign(gamma.detach()))
        opt.step()
    torch.testing.assert_close(ours, gamma.detach(), rtol=1e-5, atol=1e-6)


def test_targets_by_name_are_first_blobs():
    scale = Param("scale1", 0, torch.nn.Parameter(torch.ones(4)))
    bias = Param("scale1", 1, torch.nn.Parameter(torch.zeros(4)))
    bn = Param("bn1", 0, torch.nn.Parameter(torch.ones(4)))
    params = [scale, bias, bn]
    p = create_sparsity(solver_with(1e-4, layers=["bn1", "scale1"]), params, {"scale1": scale.tensor})
    assert list(p.targets) == ["bn1", "scale1"]
    assert p.targets["bn1"] is bn.tensor and p.targets["scale1"] is scale.tensor
    assert p.penalty == float(np.float32(1e-4)) and "bn1" in repr(p)
    # No names: the net's default scaling factors.
    assert list(create_sparsity(solver_with(1e-4), params, {"scale1": scale.tensor}).targets) == ["scale1"]


@pytest.mark.parametrize("penalty, layers, defaults, needle", [
    (1e-4, ["scale9"], "scale", "sparsity.layer \"scale9\" is not a layer with learnable blobs"),
    (-1e-4, [], "scale", "must be a finite number >= 0"),
    (1e-4, [], "none", "no channel scaling factors"),
    (1e-4, [], "stranger", "not among the train net's learnable params"),
])
def test_bad_sparsity_settings_are_refused(penalty, layers, defaults, needle):
    scale = Param("scale1", 0, torch.nn.Parameter(torch.ones(4)))
    default = {"scale": {"scale1": scale.tensor}, "none": {}, "stranger": {"scale1": torch.ones(4)}}[defaults]
    with pytest.raises(SolverError) as err:
        create_sparsity(solver_with(penalty, layers=layers), [scale], default, "s.prototxt")
    assert str(err.value).startswith("s.prototxt: ") and needle in str(err.value)
    if layers:
        assert "scale1" in str(err.value)              # the message lists the layers that exist


def test_penalty_zero_needs_no_targets_and_does_nothing():
    p = create_sparsity(solver_with(0.0), [], {})
    p()
    assert p.targets == {} and p.stats().count == 0


def test_gamma_stats_against_hand_values():
    stats = gamma_stats([torch.tensor([0.0005, -0.005]), torch.tensor([[0.05], [-0.5]])])
    assert stats == GammaStats(count=4, below_1e2=0.5, below_1e3=0.25, min_abs=pytest.approx(0.0005),
                               median_abs=pytest.approx((0.005 + 0.05) / 2))
    assert gamma_stats({"a": torch.tensor([0.0005, -0.005, 0.05, -0.5])}) == stats
    line = str(stats)
    assert "\n" not in line and "4 channels" in line and "50.00% < 1e-2" in line and "25.00% < 1e-3" in line
    empty = gamma_stats([])
    assert empty.count == 0 and math.isnan(empty.median_abs) and str(empty) == "gamma: no scaling factors"


def test_hook_reaches_targets_in_every_chunk(monkeypatch):
    import slim.solver.rules as rules

    monkeypatch.setattr(rules, "_CPU_CHUNK_NUMEL", 1)          # every param its own chunk
    gammas = [torch.nn.Parameter(torch.tensor([0.5, -0.5])) for _ in range(3)]
    params = [Param(f"scale{i}", 0, g) for i, g in enumerate(gammas)]
    params.insert(1, Param("conv", 0, torch.nn.Parameter(torch.ones(3))))
    solver = solver_with(0.25)
    rule = create_rule(solver, params)
    penalty = create_sparsity(solver, params, {f"scale{i}": g for i, g in enumerate(gammas)})
    assert len(rule._chunks) == 4
    rule.apply_update(1.0, 0, gradient_hooks=[penalty])        # no gradients at all: only the penalty
    for g in gammas:
        assert torch.equal(g.detach(), torch.tensor([0.25, -0.25]))
    assert torch.equal(params[1].tensor.detach(), torch.ones(3))
