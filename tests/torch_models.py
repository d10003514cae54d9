"""Plain-torch CNNs written by hand for the interop tests (torchvision is not importable here): VGG-, ResNet-18-,
MobileNet-v2- and MobileNet-v3-small-style nets at CIFAR size, with BatchNorm statistics that are not the identity."""

import torch
from torch import nn

__all__ = ["vgg_like", "resnet_like", "mobilenet_like", "mobilenetv3_like", "se_net", "randomize_batchnorm",
           "MODELS"]


def _conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act(inplace=True)) if act else nn.Sequential(*layers)


class VGGLike(nn.Module):
    """conv-bn-relu stacks with max pooling, then a two-layer classifier with dropout."""

    def __init__(self, widths=(8, "M", 16, "M", 32, 32, "M"), classes=10):
        super().__init__()
        layers, cin = [], 3
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(_conv_bn(cin, w))
                cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin * 4 * 4, 24), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                        nn.Linear(24, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:  # ResNet's projection shortcut
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetLike(nn.Module):
    """ResNet-18's layout (stem, max pool, four stages of two basic blocks, projection shortcuts), narrow."""

    def __init__(self, widths=(8, 16, 24, 32), classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act=nn.ReLU6)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
                   _conv_bn(hidden, cout, 1, act=None)]                                   # linear bottleneck
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetLike(nn.Module):
    """MobileNet-v2's layout: ReLU6, depthwise convolutions, inverted residuals with linear bottlenecks."""

    #: MobileNet-v2's own stages (expand, out, repeats, stride), for full-size nets.
    V2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                  (6, 320, 1, 1)]

    def __init__(self, classes=10, setting=((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2), (4, 24, 1, 1)), stem=8,
                 last=48):
        super().__init__()
        layers, cin = [_conv_bn(3, stem, 3, 1, act=nn.ReLU6)], stem
        for t, c, n, s in setting:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcitation(nn.Module):
    """x * gate(fc2(relu(fc1(avgpool(x))))), the 1x1 convolutions with biases (torchvision's layout)."""

    def __init__(self, channels, squeeze, gate=nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x):
        return self.gate(self.fc2(self.relu(self.fc1(self.avgpool(x))))) * x


class InvertedResidualV3(nn.Module):
    """MobileNet-v3's block: 1x1 expansion (unless expand == in), depthwise k x k, squeeze-and-excitation on the
    expanded channels, linear 1x1 projection, a residual when the shape allows; ReLU or HardSwish."""

    def __init__(self, cin, k, expand, cout, se, act, stride):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == cin else [_conv_bn(cin, expand, 1, act=act)]
        layers.append(_conv_bn(expand, expand, k, stride, groups=expand, act=act))
        if se:
            layers.append(SqueezeExcitation(expand, max(8, expand // 4)))
        layers.append(_conv_bn(expand, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV3Like(nn.Module):
    """MobileNet-v3-small's layout, narrow: a HardSwish stem, inverted residuals with squeeze-and-excitation gated by
    HardSigmoid, a 1x1 HardSwish head, and a classifier with a HardSwish hidden layer."""

    HS, RE = nn.Hardswish, nn.ReLU

    #: (kernel, expanded, out, squeeze-and-excitation, activation, stride), as torchvision's mobilenet_v3_small.
    SETTING = ((3, 8, 8, True, RE, 2), (3, 24, 12, False, RE, 2), (3, 32, 12, False, RE, 1),
               (5, 48, 16, True, HS, 2), (5, 64, 16, True, HS, 1))

    def __init__(self, classes=10, stem=8, last=64, hidden=32):
        super().__init__()
        layers, cin = [_conv_bn(3, stem, 3, 1, act=nn.Hardswish)], stem
        for k, expand, cout, se, act, stride in self.SETTING:
            layers.append(InvertedResidualV3(cin, k, expand, cout, se, act, stride))
            cin = cout
        layers.append(_conv_bn(cin, last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, hidden), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(hidden, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SENet(nn.Module):
    """Two conv-BN-HardSwish blocks, each followed by x * sigmoid(fc2(relu(fc1(avgpool(x))))), then a classifier:
    the smallest net with MobileNet-v3's HardSwish and squeeze-and-excitation multiplications."""

    def __init__(self, widths=(16, 24), classes=10):
        super().__init__()
        blocks, cin = [], 3
        for i, w in enumerate(widths):
            blocks += [_conv_bn(cin, w, 3, 1 if i == 0 else 2, act=nn.Hardswish),
                       SqueezeExcitation(w, w // 4, gate=nn.Sigmoid)]
            cin = w
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (as a trained net has), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.25)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def vgg_like(seed=0):
    torch.manual_seed(seed)
    return randomize_batchnorm(VGGLike(), seed)


def resnet_like(seed=0):
    torch.manual_seed(seed)
    return randomize_batchnorm(ResNetLike(), seed)


def mobilenet_like(seed=0):
    torch.manual_seed(seed)
    return randomize_batchnorm(MobileNetLike(), seed)


def mobilenetv3_like(seed=0):
    torch.manual_seed(seed)
    return randomize_batchnorm(MobileNetV3Like(), seed)


def se_net(seed=0):
    torch.manual_seed(seed)
    return randomize_batchnorm(SENet(), seed)


MODELS = {"vgg": vgg_like, "resnet": resnet_like, "mobilenet": mobilenet_like, "mobilenetv3": mobilenetv3_like,
          "se": se_net}
