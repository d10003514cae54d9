"""The training loop against Caffe's Solver::Step (REFERENCE §2.1): the trajectory, the sparsity penalty,
iter_size, the smoothed loss, and when tests, displays and snapshots happen, with Caffe's log lines."""

import json
import logging
import math
import re

import numpy as np
import pytest
import torch

from slim.graph import build_graph
from slim.io import parse_net, read_caffemodel
from slim.net import Net
from slim.solver import Hook, Solver
from slim.solver.logs import GlogFormatter
from solver_helpers import tiny_net, write_solver


def f32(x):
    return float(np.float32(x))


def reference_sgd(net_text, solver, iters):
    """Caffe's SGD loop written out by hand: h = m*h + local_rate*(g + local_decay*w); w -= h (step policy)."""
    seed = solver.random_seed
    net = Net(build_graph(parse_net(net_text), "TRAIN"), seed=seed, data_seed=seed)
    torch.manual_seed(seed)
    params = net.learnable_params
    history = [torch.zeros_like(p.tensor) for p in params]
    for it in range(iters):
        for p in params:
            p.tensor.grad = None
        net().loss.backward()
        rate = f32(solver.base_lr * solver.gamma ** (it // solver.stepsize))
        with torch.no_grad():
            for p, h in zip(params, history):
                g = p.tensor.grad if p.tensor.grad is not None else torch.zeros_like(p.tensor)
                decay = f32(solver.weight_decay * p.decay_mult)
                if decay:
                    g = g.add(p.tensor, alpha=decay)
                h.mul_(solver.momentum).add_(g, alpha=f32(rate * p.lr_mult))
                p.tensor.sub_(h)
    return net


@pytest.mark.parametrize("sparsity", ["", "{ penalty: 0 }"])
def test_without_penalty_the_trajectory_is_plain_caffe_sgd_bit_for_bit(tmp_path, sparsity):
    text = tiny_net(dropout=0.3)
    fields = dict(lr_policy="step", gamma=0.5, stepsize=4, max_iter=9)
    if sparsity:
        fields["sparsity"] = sparsity
    solver = Solver(write_solver(tmp_path, text, **fields), metrics=False)
    solver.solve()
    ref = reference_sgd(text, solver.param, 9)
    for mine, theirs in zip(solver.net.learnable_params, ref.learnable_params):
        assert torch.equal(mine.tensor, theirs.tensor), mine.name
    assert solver.iter == 9


def test_the_penalty_adds_lr_times_s_times_sign_gamma_to_one_step(tmp_path):
    text = tiny_net(channels=8)
    runs = []
    for penalty in (0.0, 0.02):
        path = write_solver(tmp_path, text, name=f"p{penalty}", max_iter=1, momentum=0.0, weight_decay=0.0,
                            sparsity=f"{{ penalty: {penalty} }}")
        solver = Solver(path, metrics=False)
        gamma0 = solver.net.params["scale"][0].detach().clone()
        solver.step(1)
        runs.append(solver.net.params["scale"][0].detach())
    # One step from the same weights on the same batch: the only difference is lr * s * sign(gamma).
    step = runs[0] - runs[1]
    torch.testing.assert_close(step, 0.1 * f32(0.02) * torch.sign(gamma0), rtol=1e-4, atol=1e-7)


def test_the_penalty_drives_the_scaling_factors_to_zero(tmp_path):
    text = tiny_net(channels=32)
    gammas = {}
    for penalty in (0.0, 0.05):
        path = write_solver(tmp_path, text, name=f"p{penalty}", max_iter=60, lr_policy="step", gamma=0.1,
                            stepsize=30, sparsity=f"{{ penalty: {penalty} }}")
        solver = Solver(path, metrics=False)
        solver.solve()
        assert solver.sparsity.targets.keys() == {"scale"} and solver.sparsity.stats().count == 32
        gammas[penalty] = solver.net.params["scale"][0].detach().abs()
    plain, sparse = gammas[0.0], gammas[0.05]
    assert sparse.median() < 0.2 * plain.median() and sparse.sum() < 0.25 * plain.sum()
    assert (sparse < 0.1).float().mean() >= 0.5 > 0.1 >= (plain < 0.1).float().mean()


def test_iter_size_accumulates_like_a_batch_that_many_times_larger(tmp_path):
    finals = []
    for batch, iter_size in ((16, 1), (8, 2)):
        path = write_solver(tmp_path, tiny_net(batch=batch, bn=False), name=f"b{batch}", iter_size=iter_size,
                            max_iter=6)
        solver = Solver(path, metrics=False)
        solver.solve()
        finals.append([p.tensor.detach().clone() for p in solver.net.learnable_params])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class LossLog(Hook):
    def __init__(self):
        self.losses = []

    def after_step(self, solver):
        self.losses.append(solver.loss)


def test_smoothed_loss_is_the_mean_of_the_last_average_loss_losses(tmp_path):
    path = write_solver(tmp_path, tiny_net(), max_iter=9, display=2, average_loss=3)
    hook = LossLog()
    solver = Solver(path, hooks=[hook])
    solver.step(9)
    records = [json.loads(line) for line in (tmp_path / "solver.metrics.jsonl").read_text().splitlines()]
    train = {r["iter"]: r for r in records if r["kind"] == "train"}
    assert sorted(train) == [0, 2, 4, 6, 8]
    for it, r in train.items():
        window = hook.losses[max(0, it - 2):it + 1]
        assert r["loss"] == pytest.approx(sum(window) / len(window), rel=1e-6)
        assert r["lr"] == pytest.approx(0.1) and r["outputs"]["loss"] == pytest.approx(hook.losses[it], rel=1e-6)


# The regular expressions BVLC's tools/extra/parse_log.py applies to a Caffe log, and its timestamp format.
ITERATION = re.compile(r"Iteration (\d+)")
TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
GLOG_PREFIX = re.compile(r"^[IWEF]\d{4} \d{2}:\d{2}:\d{2}\.\d{6} +\d+ \S+:\d+\] ")


def test_tests_displays_and_snapshots_happen_when_caffe_has_them(tmp_path, caplog):
    path = write_solver(tmp_path, tiny_net(), max_iter=7, test_iter=2, test_interval=3, display=2,
                        snapshot=3, snapshot_after_train=True, test_compute_loss=True)
    with caplog.at_level(logging.INFO, logger="slim"):
        Solver(path).solve()
    lines = [GlogFormatter().format(r) for r in caplog.records]
    text = "\n".join(lines)
    assert all(GLOG_PREFIX.match(line) for line in lines)
    # Tests before the updates of iterations 0, 3, 6; none at 7 = max_iter (7 % 3 != 0).
    assert re.findall(r"Iteration (\d+), Testing net \(#0\)", text) == ["0", "3", "6"]
    assert len(TEST_OUTPUT.findall(text)) == 6 and text.count("Test loss: ") == 3
    # Displays at 0, 2, 4, 6, each with its lr line and train outputs; none after the loop (7 % 2 != 0).
    assert re.findall(r"Iteration (\d+) \([\d.e+-]+ iter/s, [\d.e+-]+s/2 iters\), loss = [\d.e+-]+", text) == \
        ["0", "2", "4", "6"]
    assert [m[0] for m in LEARNING_RATE.findall(text)] == ["0.1"] * 4
    assert [m[1] for m in TRAIN_OUTPUT.findall(text)] == ["loss"] * 4
    assert "gamma: 6 channels" in text
    # Snapshots at 3 and 6 and, after training, at 7.
    assert re.findall(r"Snapshotting to binary proto file (\S+)", text) == [
        f"{tmp_path}/solver_iter_{i}.caffemodel" for i in (3, 6, 7)]
    assert text.index("Solving tiny") < text.index("Iteration 0") and text.rstrip().endswith("Optimization Done.")
    model = read_caffemodel(tmp_path / "solver_iter_7.caffemodel")
    assert [l.name for l in model.layers if l.blobs] == ["conv", "bn", "scale", "ip"]
    records = [json.loads(line) for line in (tmp_path / "solver.metrics.jsonl").read_text().splitlines()]
    tests = [r for r in records if r["kind"] == "test"]
    assert [r["iter"] for r in tests] == [0, 3, 6] and set(tests[0]["outputs"]) == {"acc", "loss"}
    assert all(0 <= r["outputs"]["acc"] <= 1 and r["loss"] == pytest.approx(r["outputs"]["loss"]) for r in tests)


def test_no_test_at_zero_without_test_initialization_and_a_final_test_and_display(tmp_path, caplog):
    path = write_solver(tmp_path, tiny_net(), max_iter=4, test_iter=1, test_interval=2, display=4,
                        test_initialization=False)
    with caplog.at_level(logging.INFO, logger="slim"):
        Solver(path, metrics=False).solve()
    text = caplog.text
    assert re.findall(r"Iteration (\d+), Testing net", text) == ["2", "4"]
    assert re.search(r"Iteration 4, loss = [\d.]+\n", text)  # the forward-only pass after the loop
    assert not list(tmp_path.glob("*.caffemodel"))  # snapshot_after_train false


def test_test_averages_every_output_over_test_iter_batches(tmp_path):
    path = write_solver(tmp_path, tiny_net(test_batch=60), max_iter=3, test_iter=6, test_interval=100)
    solver = Solver(path, metrics=False)
    solver.step(3)
    ev = solver.test(0)
    # 6 batches of 60 are the 360 test digits in order: the mean accuracy is the accuracy on all of them.
    from slim.data.digits import load_digits
    digits = load_digits(False)
    x = torch.as_tensor(digits.images, dtype=torch.float32) * 0.0625
    net = solver.test_nets[0]
    with torch.no_grad():
        scores = torch.nn.functional.relu(torch.nn.functional.batch_norm(
            torch.nn.functional.conv2d(x, net.params["conv"][0]), net.params["bn"][0] / net.params["bn"][2],
            net.params["bn"][1] / net.params["bn"][2], net.params["scale"][0], net.params["scale"][1], False, 0, 1e-5))
        logits = scores.flatten(1) @ net.params["ip"][0].T + net.params["ip"][1]
    accuracy = (logits.argmax(1) == torch.as_tensor(digits.labels)).double().mean().item()
    assert ev.as_dict()["acc"] == pytest.approx(accuracy, abs=1e-6)  # float32 per-batch accuracies
    assert ev.scores[1].loss_weight == 1 and str(ev.scores[1]).startswith("loss = ")
    assert math.isclose(ev.loss, ev.scores[1].value, rel_tol=1e-9)


class FakeTerminal:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_the_progress_bar_stays_below_the_log_lines():
    from slim.solver.logs import reset_logging, setup_logging
    term = FakeTerminal()
    bar = setup_logging(stream=term)
    try:
        assert bar is not None
        bar.update(50, 100, 0.25)
        assert term.text.endswith("50/100 0.0 it/s loss 0.25 eta --:--") and "\n" not in term.text
        logging.getLogger("slim.solver.solver").info("Iteration 50, lr = 0.1")
        # The bar is lifted (carriage return + erase line), the line written, the bar drawn again below it.
        tail = term.text.split("] 50/100")[-2:]
        assert "Iteration 50, lr = 0.1\n\r\x1b[K[" in term.text and len(tail) == 2
        bar.close()
        assert term.text.endswith("\n")
    finally:
        reset_logging()
    assert setup_logging(stream=FakeTerminal(), progress=False) is None
    reset_logging()


def test_metrics_file_keeps_only_records_before_a_resumed_iteration(tmp_path):
    from slim.solver.logs import MetricsFile
    m = MetricsFile(tmp_path / "m.jsonl")
    for it in (0, 5, 10, 15):
        m.write({"kind": "train", "iter": it})
    m.truncate_from(10)
    assert [json.loads(x)["iter"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [0, 5]
