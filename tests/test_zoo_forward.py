"""Every deploy net of the zoo builds into a slim.Net and runs forward on the CPU with finite outputs."""

from pathlib import Path

import pytest
import torch

from slim.net import Net
from slim.zoo import ZOO

NETS = Path(__file__).resolve().parents[1] / "nets"
DEPLOY = sorted(p.name for p in NETS.glob("*_deploy.prototxt"))


def test_the_zoo_has_deploy_nets():
    assert len(DEPLOY) == len(ZOO) == 19  # one deploy net per zoo net


@pytest.mark.parametrize("name", DEPLOY)
def test_deploy_net_runs_forward(name):
    torch.manual_seed(0)
    net = Net(NETS / name, phase="TEST", seed=0)
    with torch.no_grad():  # fresh BatchNorm statistics are all 0 (var 0 scales by 1/sqrt(eps)); use unit variance
        for node in net.graph.layers:
            if node.type == "BatchNorm":
                net.params[node.name][1].fill_(1.0)
                net.params[node.name][2].fill_(1.0)
    shape = net.graph.layers[0].top_shapes[0]
    with torch.no_grad():
        out = net(data=torch.randn(shape))
    (logits,) = out.values()
    assert logits.shape == (shape[0], 100 if "cifar100" in name else 1000 if "imagenet" in name else 10)
    assert torch.isfinite(logits).all()
