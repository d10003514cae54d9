"""Which nets a solver names and with which NetState (Caffe's InitTrainNet/InitTestNets), and the solver files."""

from pathlib import Path

import pytest

from slim import proto as pb
from slim.errors import SolverError
from slim.graph import build_graph
from slim.io import parse_solver, read_solver
from slim.solver.nets import solver_nets, split_weights

ROOT = Path(__file__).resolve().parents[1]
TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"

NET = """
name: "tiny"
state { stage: "from-net" }
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "only_b" type: "Silence" bottom: "ip" include { stage: "b" } }
"""


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    return str(path)


def test_generic_net_gives_one_test_net_per_test_iter_with_merged_states(net_file):
    s = parse_solver(f'net: "{net_file}" test_iter: 5 test_iter: 7 test_interval: 10 '
                     'train_state { stage: "t" } test_state { stage: "a" } test_state { stage: "b" level: 2 }')
    nets = solver_nets(s, "s.prototxt")
    assert nets.train.state.phase == pb.TRAIN and list(nets.train.state.stage) == ["from-net", "t"]
    assert [t.test_iter for t in nets.tests] == [5, 7]
    assert [list(t.state.stage) for t in nets.tests] == [["from-net", "a"], ["from-net", "b"]]
    assert all(t.state.phase == pb.TEST for t in nets.tests) and nets.tests[1].state.level == 2
    # The states select layers: stage b includes the Silence layer, the TEST phase the accuracy.
    g = build_graph(nets.tests[1].net, state=nets.tests[1].state)
    assert "only_b" in [n.name for n in g.layers] and "acc" in [n.name for n in g.layers]
    assert "acc" not in [n.name for n in build_graph(nets.train.net, state=nets.train.state).layers]


def test_test_nets_come_in_caffes_order(net_file):
    inline = parse_solver(f'train_net: "{net_file}" test_net: "{net_file}" test_iter: 1 test_iter: 2 '
                          f'test_interval: 1 test_net_param {{ {NET} }}')
    tests = solver_nets(inline, "s.prototxt").tests
    assert tests[0].source.startswith("test_net_param #0") and tests[1].source == net_file
    assert [t.test_iter for t in tests] == [1, 2]


@pytest.mark.parametrize("text, message", [
    ('base_lr: 0.1', "names no train net"),
    ('net: "{f}" train_net: "{f}"', "more than once"),
    ('train_net: "{f}" test_iter: 3 test_interval: 1', "exactly one test_iter per test net"),
    ('net: "{f}" test_iter: 3', "test_interval > 0"),
    ('net: "{f}" test_iter: 3 test_iter: 3 test_interval: 5 test_state {{ stage: "a" }}', "test_state once per test"),
    ('net: "{f}" test_iter: 0 test_interval: 5', "must be positive"),
    ('net: "no/such/net.prototxt"', "does not exist"),
])
def test_bad_net_choices_fail_with_a_clear_message(net_file, text, message):
    with pytest.raises(SolverError, match=message):
        solver_nets(parse_solver(text.format(f=net_file)), "s.prototxt")


def test_net_paths_fall_back_to_the_solver_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "net.prototxt").write_text(NET)
    solver = tmp_path / "sub" / "solver.prototxt"
    solver.write_text('net: "net.prototxt"')
    monkeypatch.chdir(tmp_path)  # net.prototxt is not in the working directory, but beside the solver
    nets = solver_nets(read_solver(solver), solver)
    assert Path(nets.train.source) == tmp_path / "sub" / "net.prototxt"


def test_weights_entries_split_on_commas():
    assert split_weights(["a.caffemodel,b.caffemodel", " c.caffemodel "]) == ["a.caffemodel", "b.caffemodel",
                                                                            "c.caffemodel"]


def test_real_caffe_solvers_parse_and_name_their_missing_net(monkeypatch):
    if not TESTNETS.is_dir():
        pytest.skip(f"{TESTNETS} (real Caffe files) is absent")
    monkeypatch.chdir(TESTNETS)
    s = read_solver("examples__mnist__lenet_solver.prototxt")
    assert s.net == "examples/mnist/lenet_train_test.prototxt" and s.lr_policy == "inv"
    with pytest.raises(SolverError, match="lenet_train_test.prototxt\" does not exist"):
        solver_nets(s, "examples__mnist__lenet_solver.prototxt")
    # With the net where the solver expects it: one TRAIN net and one TEST net (test_iter 100) from the same file.
    s.net = "examples__mnist__lenet_train_test.prototxt"
    nets = solver_nets(s, "examples__mnist__lenet_solver.prototxt")
    assert nets.train.state.phase == pb.TRAIN and [t.test_iter for t in nets.tests] == [100]
    assert nets.tests[0].net is nets.train.net and nets.tests[0].state.phase == pb.TEST


SOLVERS = sorted((ROOT / "solvers").glob("*.prototxt"))


@pytest.mark.parametrize("path", SOLVERS, ids=[p.stem for p in SOLVERS])
def test_solver_files_parse_and_their_nets_build(path, monkeypatch):
    from slim.solver.lr import LrSchedule
    from slim.solver.rules import RULES

    monkeypatch.chdir(ROOT)
    s = read_solver(path.relative_to(ROOT))
    LrSchedule(s, str(path))
    assert s.type in RULES and s.random_seed >= 0
    if s.net == "pruned.prototxt":  # a fine-tuning solver: the pruned net is the sparse solver's net, narrower
        sparse = read_solver(str(path.relative_to(ROOT)).replace("_finetune", "_sparse"))
        assert s.sparsity.penalty == 0 and not s.HasField("sparsity")
        if "fashion" in path.stem:  # bench_fashion's recipe: a short fine-tune at a tenth of the rate
            assert s.max_iter < sparse.max_iter and s.base_lr == pytest.approx(sparse.base_lr * 0.1)
        else:
            assert (list(s.stepvalue), s.max_iter) == (list(sparse.stepvalue), sparse.max_iter)
            # The paper fine-tunes with the training schedule; the demo at a tenth of the rate.
            assert s.base_lr == pytest.approx(sparse.base_lr * (0.1 if "demo" in path.stem else 1))
        s.net = sparse.net
    nets = solver_nets(s, path)
    train = build_graph(nets.train.net, state=nets.train.state, source=nets.train.source)
    assert train.loss_layers
    for spec in nets.tests:
        test = build_graph(spec.net, state=spec.state, source=spec.source)
        batch = test.layers[0].top_shapes[0][0]
        if "cifar" in path.stem:  # the paper's setting: one epoch between tests, all 10,000 test images
            assert spec.test_iter * batch == 10000 and s.test_interval == 782 and s.max_iter == 125000
            assert list(s.stepvalue) == [62500, 93750] and s.momentum == pytest.approx(0.9)
        elif "fashion" in path.stem:  # every Fashion-MNIST test image once
            assert spec.test_iter * batch == 10000
        else:
            assert spec.test_iter * batch == 360
    if "_sparse" in path.stem and "cifar" in path.stem:
        assert s.sparsity.penalty == pytest.approx(1e-4 if "vgg" in path.stem else 1e-5)


@pytest.mark.parametrize("stage", ["baseline", "sparse", "finetune"])
def test_demo_solver_files_are_the_demo_commands_solvers(stage):
    demo = pytest.importorskip("slim.demo")
    net = "pruned.prototxt" if stage == "finetune" else "nets/demo_digits.prototxt"
    assert read_solver(ROOT / "solvers" / f"demo_digits_{stage}.prototxt") == demo.demo_solver(stage, net)
