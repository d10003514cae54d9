"""The real BVLC Caffe files in ../shared/caffe/testnets/: every net and solver parses (V1 upgraded), the deploy
nets build and run forward, and their weights survive a save/load round trip."""

from pathlib import Path

import pytest
import torch

from slim.graph import build_graph
from slim.io import read_net, read_solver
from slim.net import Net

TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"
pytestmark = pytest.mark.skipif(not TESTNETS.is_dir(), reason=f"{TESTNETS} is absent (it exists beside the checkout "
                                                              f"in CI, not on a user's machine)")

NETS = sorted(p.name for p in TESTNETS.glob("*.prototxt") if "solver" not in p.name) if TESTNETS.is_dir() else []
SOLVERS = sorted(p.name for p in TESTNETS.glob("*solver*.prototxt")) if TESTNETS.is_dir() else []
DEPLOY = ["examples__mnist__lenet.prototxt", "models__bvlc_alexnet__deploy.prototxt",
          "v1__models__bvlc_alexnet__deploy.prototxt"]


@pytest.mark.parametrize("name", NETS)
def test_every_net_parses_as_v2(name):
    net = read_net(TESTNETS / name)
    assert net.layer and not net.layers and not net.input and not net.input_dim


@pytest.mark.parametrize("name", SOLVERS)
def test_every_solver_parses(name):
    solver = read_solver(TESTNETS / name)
    assert solver.type and solver.lr_policy and solver.base_lr > 0


@pytest.mark.parametrize("name", DEPLOY)
def test_deploy_nets_build_and_run(name, tmp_path):
    net = read_net(TESTNETS / name)
    if "alexnet" in name:  # keep the test fast: batch 1 instead of 10
        net.layer[0].input_param.shape[0].dim[0] = 1
    model = Net(net, phase="TEST", seed=0)
    x = torch.randn(model.graph.layers[0].top_shapes[0])
    out = model(data=x)
    (prob,) = out.values()
    assert prob.shape[1] in (10, 1000)
    torch.testing.assert_close(prob.sum(1), torch.ones(prob.shape[0]))  # the deploy nets end in Softmax
    model.save(tmp_path / "w.caffemodel")
    again = Net(net, weights=tmp_path / "w.caffemodel", phase="TEST")
    torch.testing.assert_close(again(data=x)[next(iter(out))], prob, rtol=0, atol=0)


def test_v1_and_v2_alexnet_build_the_same_graph():
    v1 = build_graph(TESTNETS / "v1__models__bvlc_alexnet__deploy.prototxt")
    v2 = build_graph(TESTNETS / "models__bvlc_alexnet__deploy.prototxt")
    assert [(n.type, n.top_shapes, n.blob_shapes) for n in v1.layers] == \
           [(n.type, n.top_shapes, n.blob_shapes) for n in v2.layers]
    assert v2.param_count == 60_965_224


@pytest.mark.parametrize("name,shape", [("examples__mnist__lenet_train_test.prototxt", (1, 28, 28)),
                                        ("examples__cifar10__cifar10_quick_train_test.prototxt", (3, 32, 32)),
                                        ("examples__cifar10__cifar10_full_sigmoid_train_test_bn.prototxt",
                                         (3, 32, 32))])
def test_train_test_nets_build_and_run_through_their_deploy_form(name, shape):
    from slim.deploy import make_deploy
    deploy = make_deploy(read_net(TESTNETS / name), input_shapes={"data": shape}, batch=2)
    model = Net(deploy, phase="TEST", seed=0)
    out = model(data=torch.randn(2, *shape))
    assert all(torch.isfinite(v).all() for v in out.values())
