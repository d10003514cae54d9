"""Hand-written PyTorch versions of zoo nets, for side-by-side benchmarks (forward memory and time, build time).

Each model is what a PyTorch user would write for the architecture of the prototxt: nn.Conv2d, nn.BatchNorm2d,
in-place ReLU where it is safe, functional pooling. ``load_from_net`` copies a slim.Net's blobs into one (Caffe's
BatchNorm + Scale pair becomes one BatchNorm2d), so a benchmark can check that both compute the same function
before it times them.

  VGG (bench_train_step.VGG)   nets/vgg19_cifar10_deploy.prototxt
  PreResNet                    nets/resnet164_cifar10_deploy.prototxt (pre-activation bottleneck, projection on the
                               first block of each stage, as slim.zoo.preresnet_bottleneck_cifar)
  DenseNet                     nets/densenet40_cifar10_deploy.prototxt (no bottleneck or compression, as
                               slim.zoo.densenet_cifar)
"""

from typing import List

import torch
from torch import nn
from torch.nn import functional as F

from bench_train_step import VGG  # beside this script

__all__ = ["VGG", "PreResNet", "DenseNet", "HAND_MODELS", "load_from_net"]


class _Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(w)-BN-ReLU-conv3x3(w, stride)-BN-ReLU-conv1x1(4w), plus the input or its 1x1 projection."""

    def __init__(self, cin: int, width: int, stride: int, project: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, 4 * width, 1, stride, bias=False) if project else None

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x), inplace=True))
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        y = self.conv3(F.relu(self.bn3(y), inplace=True))
        return y + (self.shortcut(x) if self.shortcut is not None else x)


class PreResNet(nn.Module):
    """Pre-activation bottleneck ResNet-(9n+2) for CIFAR (He et al. 2016), network slimming's ResNet-164."""

    def __init__(self, depth: int = 164, classes: int = 10):
        super().__init__()
        n = (depth - 2) // 9
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, c = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(_Bottleneck(c, width, 2 if i == 0 and stage > 0 else 1, i == 0))
                c = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.conv1(x))), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x), inplace=True))], 1)


class _Transition(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x), inplace=True)), 2)


class DenseNet(nn.Module):
    """DenseNet-(3n+4) for CIFAR without bottlenecks or compression (Huang et al. 2017), network slimming's."""

    def __init__(self, depth: int = 40, growth: int = 12, classes: int = 10):
        super().__init__()
        n = (depth - 4) // 3
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        layers, c = [], 16
        for block in range(3):
            for _ in range(n):
                layers.append(_DenseLayer(c, growth))
                c += growth
            if block < 2:
                layers.append(_Transition(c))
        self.features = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.features(self.conv1(x))), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


#: zoo deploy prototxt -> the hand-written model of the same architecture.
HAND_MODELS = {"vgg19": ("nets/vgg19_cifar10_deploy.prototxt", VGG),
               "resnet164": ("nets/resnet164_cifar10_deploy.prototxt", PreResNet),
               "densenet40": ("nets/densenet40_cifar10_deploy.prototxt", DenseNet)}


def load_from_net(model: nn.Module, net) -> nn.Module:
    """Copy ``net``'s blobs (a slim.Net of the same architecture) into ``model``, layer by layer in order.

    Convolution -> Conv2d, InnerProduct -> Linear, BatchNorm + Scale -> BatchNorm2d (Caffe stores mean * s and
    var * s with the factor s in a third blob; Scale holds gamma and beta). The models above register their modules
    in the prototxt's layer order, which this relies on; a mismatch of kind or shape is an AssertionError.
    """
    ours: List[nn.Module] = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    params = net.params
    theirs = [n for n in net.graph.layers if n.type in ("Convolution", "InnerProduct", "BatchNorm")]
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    scale_of = {n.bottom_ids[0]: n.name for n in net.graph.layers if n.type == "Scale"}
    with torch.no_grad():
        for module, node in zip(ours, theirs):
            blobs = params[node.name]
            if node.type == "BatchNorm":
                assert isinstance(module, nn.BatchNorm2d), (module, node.name)
                s = float(blobs[2].reshape(-1)[0])
                s = 1 / s if s != 0 else 0.0
                module.running_mean.copy_(blobs[0] * s)
                module.running_var.copy_(blobs[1] * s)
                gamma, beta = params[scale_of[node.top_ids[0]]]
                module.weight.copy_(gamma)
                module.bias.copy_(beta)
                module.eps = node.param.batch_norm_param.eps
            else:
                assert module.weight.shape == blobs[0].shape, (node.name, module.weight.shape, blobs[0].shape)
                module.weight.copy_(blobs[0])
                if module.bias is not None:
                    module.bias.copy_(blobs[1])
    return model
