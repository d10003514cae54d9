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
  MobileNetV2                  nets/mobilenet_v2_imagenet_deploy.prototxt (ReLU for ReLU6, as slim.zoo.mobilenet_v2)

``hand_model(key, net)`` builds the model at the widths of a (pruned) slim net of that architecture: the plain-torch
counterpart of a pruned prototxt, for measured speed-ups (benchmarks/bench_speedup.py).
"""

from typing import Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from bench_train_step import VGG  # beside this script

__all__ = ["VGG", "PreResNet", "DenseNet", "MobileNetV2", "HAND_MODELS", "load_from_net", "conv_widths", "vgg_cfg",
           "hand_model"]


def _width(widths: Optional[Mapping[str, int]], name: str, default: int) -> int:
    return widths.get(name, default) if widths else default


class _Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(w1)-BN-ReLU-conv3x3(w2, stride)-BN-ReLU-conv1x1(cout), plus the input or its 1x1 projection
    (unpruned: w1 = w2 = w, cout = 4w)."""

    def __init__(self, cin: int, w1: int, w2: int, cout: int, stride: int, project: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, w1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, cout, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if project else None

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x), inplace=True))
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        y = self.conv3(F.relu(self.bn3(y), inplace=True))
        return y + (self.shortcut(x) if self.shortcut is not None else x)


class PreResNet(nn.Module):
    """Pre-activation bottleneck ResNet-(9n+2) for CIFAR (He et al. 2016), network slimming's ResNet-164."""

    def __init__(self, depth: int = 164, classes: int = 10, widths: Optional[Mapping[str, int]] = None):
        super().__init__()
        n = (depth - 2) // 9
        c = _width(widths, "conv1", 16)
        self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        blocks = []
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                name = f"res{stage + 2}_{i + 1}"
                w1, w2 = _width(widths, f"{name}/conv1", width), _width(widths, f"{name}/conv2", width)
                cout = _width(widths, f"{name}/conv3", 4 * width)
                blocks.append(_Bottleneck(c, w1, w2, cout, 2 if i == 0 and stage > 0 else 1, i == 0))
                c = cout
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


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class _InvertedResidual(nn.Module):
    """[1x1 expansion-BN-ReLU], depthwise 3x3-BN-ReLU, linear 1x1-BN; plus the input when ``residual``."""

    def __init__(self, cin: int, hidden: Optional[int], dwise: int, cout: int, stride: int, residual: bool):
        super().__init__()
        layers: List[nn.Module] = []
        if hidden is not None:
            layers += _conv_bn(cin, hidden, 1) + [nn.ReLU(inplace=True)]
        layers += _conv_bn(dwise, dwise, 3, stride, groups=dwise) + [nn.ReLU(inplace=True)]
        layers += _conv_bn(dwise, cout, 1)
        self.body = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNet v2, width 1.0, 224x224 (Sandler et al. 2018), as slim.zoo.mobilenet_v2 writes it: ReLU for ReLU6,
    no expansion convolution in the blocks with expansion factor 1; ``widths`` by the prototxt's layer names."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, classes: int = 1000, widths: Optional[Mapping[str, int]] = None):
        super().__init__()
        c = _width(widths, "conv1", 32)
        layers = _conv_bn(3, c, 3, 2) + [nn.ReLU(inplace=True)]
        base = 32                                      # the unpruned widths decide where the shortcuts are
        for stage, (expansion, width, repeats, first_stride) in enumerate(self.SETTINGS, start=2):
            for index in range(1, repeats + 1):
                name = f"conv{stage}_{index}"
                hidden = _width(widths, f"{name}/expand", base * expansion) if expansion != 1 else None
                dwise = _width(widths, f"{name}/dwise", base * expansion)
                cout = _width(widths, f"{name}/linear", width)
                stride = first_stride if index == 1 else 1
                layers.append(_InvertedResidual(c, hidden, dwise, cout, stride, stride == 1 and base == width))
                c, base = cout, width
        last = _width(widths, "conv9", 1280)
        layers += _conv_bn(c, last, 1) + [nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


#: zoo deploy prototxt -> the hand-written model of the same architecture.
HAND_MODELS = {"vgg19": ("nets/vgg19_cifar10_deploy.prototxt", VGG),
               "resnet164": ("nets/resnet164_cifar10_deploy.prototxt", PreResNet),
               "densenet40": ("nets/densenet40_cifar10_deploy.prototxt", DenseNet)}


def neutral_batchnorm(net):
    """Set every BatchNorm of a slim Net to mean 0, variance 1 (Caffe's fillers leave the statistics all zero, which
    divides by sqrt(eps) in every layer); returns the net."""
    with torch.no_grad():
        for node in net.graph.layers:
            if node.type == "BatchNorm":
                for blob, value in zip(net.params[node.name], (0.0, 1.0, 1.0)):
                    blob.fill_(value)
    return net


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


def conv_widths(graph) -> Dict[str, int]:
    """Convolution and InnerProduct layer name -> its output channels, from a slim NetGraph."""
    return {n.name: int(n.top_shapes[0][1]) for n in graph.layers if n.type in ("Convolution", "InnerProduct")}


def vgg_cfg(graph) -> list:
    """The VGG cfg (widths and "M" for each 2x2 max pooling) of a slim VGG NetGraph, pruned or not."""
    cfg = []
    for n in graph.layers:
        if n.type == "Convolution":
            cfg.append(int(n.top_shapes[0][1]))
        elif n.type == "Pooling" and n.layer.param.pooling_param.pool == 0:  # MAX; the final AVE is the model's own
            cfg.append("M")
    return cfg


def hand_model(key: str, graph) -> nn.Module:
    """The hand-written model of ``key`` ("vgg19", "resnet164", "mobilenetv2") at the widths of ``graph`` (a slim
    NetGraph of that architecture, pruned or not), in eval mode; load its blobs with ``load_from_net``."""
    widths = conv_widths(graph)
    if key == "vgg19":
        return VGG(vgg_cfg(graph)).eval()
    if key == "resnet164":
        return PreResNet(164, widths=widths).eval()
    if key == "mobilenetv2":
        return MobileNetV2(widths=widths).eval()
    raise KeyError(f"no hand-written model for {key!r}")
