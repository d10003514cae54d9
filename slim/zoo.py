"""The model zoo: the seeds' architectures generated as Caffe train/test prototxt.

Every net is built by a small generator from its family's recipe (VGG cfg, ResNet depth, DenseNet depth and
growth), so the files in nets/ are reproducible with ``python tools/zoo.py`` and never edited by hand. A
generated net is what a Caffe user would write:

* a TRAIN and a TEST data layer with tops ``data`` and ``label`` (``SlimData`` for the small datasets, LMDB
  ``Data`` for ImageNet), SoftmaxWithLoss ``loss`` and, in TEST, ``accuracy``;
* BatchNorm as Caffe's BatchNorm + Scale(bias_term) pair, in place after a bias-free convolution; BatchNorm's
  three statistics blobs get no ``param {}``: modern Caffe forces their lr_mult to 0 itself;
* msra fillers for convolutions, xavier for InnerProduct, and Caffe's customary ``lr_mult: 2 decay_mult: 0``
  on biases.

Example::

    from slim.zoo import ZOO, write_zoo
    net = ZOO["resnet56_cifar10"]()        # a pb.NetParameter
    write_zoo("nets")                       # every net and its deploy net, as prototxt
"""

from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from slim import proto as pb
from slim.deploy import make_deploy
from slim.errors import NetError, SlimError
from slim.graph import build_graph
from slim.io.atomic import atomic_write
from slim.io.text import net_to_text

__all__ = ["ZOO", "ABOUT", "ZooInfo", "VGG_CFGS", "vgg_cifar", "vgg16_imagenet", "resnet_cifar",
           "preresnet_bottleneck_cifar", "densenet_cifar", "resnet_imagenet", "mobilenet_v1", "mobilenet_v2",
           "vgg_fashion", "resnet_fashion", "VGG7_FASHION_CFG", "FASHION_MNIST_SOURCE", "demo_digits", "zoo_header",
           "render_zoo", "write_zoo", "stale_zoo_files"]

# ---------------------------------------------------------------------------------------------------------------
# Data recipes
# ---------------------------------------------------------------------------------------------------------------

_CIFAR_SOURCE = {pb.SlimDataParameter.CIFAR10: "data/cifar-10-batches-py",
                 pb.SlimDataParameter.CIFAR100: "data/cifar-100-python"}
# Caffe's transform is (x - mean_value[c]) * scale with a single scale. The per-channel means of the CIFAR training
# sets (RGB, 0..255) are 125.3/123.0/113.9 (CIFAR-10) and 129.3/124.1/112.4 (CIFAR-100), rounded here to integers as
# Caffe users write them; their per-channel standard deviations are 62 to 70, so one scale of 1/64 gives inputs of
# roughly unit variance (an exact binary fraction, so the prototxt reads 0.015625 rather than a rounding artefact).
_CIFAR_MEAN = {pb.SlimDataParameter.CIFAR10: (125, 123, 114), pb.SlimDataParameter.CIFAR100: (129, 124, 112)}
_CIFAR_SCALE = 1 / 64
# ImageNet in Caffe's BGR order, as in the BVLC and KaimingHe models.
_IMAGENET_MEAN = (104, 117, 123)
#: Where Debian's dataset-fashion-mnist package installs the four IDX files (``apt-get install
#: dataset-fashion-mnist``); edit slim_data_param.source to read them (or MNIST) from elsewhere.
FASHION_MNIST_SOURCE = "/usr/share/datasets/fashion-mnist"
# Fashion-MNIST's training pixels (0..255) have mean 72.94 and standard deviation 90.0; as for CIFAR one scale of
# 1/64 (an exact binary fraction) gives inputs of standard deviation 1.4, and BatchNorm follows the first conv.
_FASHION_MEAN, _FASHION_SCALE = 73, 1 / 64


@dataclass(frozen=True)
class ZooInfo:
    """What a zoo net is, for the comment that heads its prototxt.

    Attributes:
        title: one line naming the architecture and its dataset.
        paper: the paper (or reference implementation) whose recipe it follows.
    """

    title: str
    paper: str


class _Builder:
    """Appends layers to a NetParameter; each method returns the blob its layer produced.

    It remembers the channel count of each blob it made, because a few recipes need it (a depthwise convolution's
    group, the zero channels of an option-A shortcut, whether a shortcut needs a projection).
    """

    def __init__(self, name: str):
        self.net = pb.NetParameter(name=name)
        self.channels: Dict[str, int] = {}

    def layer(self, name: str, type_: str, bottom: Sequence[str], top: Sequence[str]) -> pb.LayerParameter:
        layer = self.net.layer.add(name=name, type=type_)
        layer.bottom.extend(bottom)
        layer.top.extend(top)
        return layer

    # -- data, loss -------------------------------------------------------------------------------------------

    def slim_data(self, dataset: int, source: str, train_batch: int, test_batch: int, channels: int,
                  mean: Sequence[float], scale: float, crop: int = 0, pad: int = 0) -> str:
        """A TRAIN and a TEST ``SlimData`` layer; TRAIN adds the random crop of the padded image and the flip."""
        for phase, batch in ((pb.TRAIN, train_batch), (pb.TEST, test_batch)):
            layer = self.layer("data", "SlimData", [], ["data", "label"])
            layer.include.add(phase=phase)
            param = layer.slim_data_param
            param.dataset = dataset
            if source:
                param.source = source
            param.batch_size = batch
            param.train = phase == pb.TRAIN
            if phase == pb.TEST:
                param.shuffle = False
            transform = layer.transform_param
            if phase == pb.TRAIN and crop:
                transform.mirror = True
                transform.crop_size = crop
                transform.pad = pad
            transform.mean_value.extend(mean)
            if scale != 1:
                transform.scale = scale
        self.channels["data"] = channels
        return "data"

    def cifar_data(self, dataset: int) -> str:
        """CIFAR-10/100: batch 64 for training, 100 for testing; 4-pixel padding, random 32x32 crop and flip."""
        return self.slim_data(dataset, _CIFAR_SOURCE[dataset], 64, 100, 3, _CIFAR_MEAN[dataset], _CIFAR_SCALE,
                              crop=32, pad=4)

    def fashion_data(self) -> str:
        """Fashion-MNIST (or any MNIST-format IDX folder): batch 64 for training, 100 for testing; TRAIN pads 2
        pixels, crops 28x28 at random and flips (clothes stay clothes when mirrored). TEST states crop_size 28, the
        whole image, so that tools building the net without the data (calflop, deploy nets) know its input size."""
        x = self.slim_data(pb.SlimDataParameter.IDX, FASHION_MNIST_SOURCE, 64, 100, 1, (_FASHION_MEAN,),
                           _FASHION_SCALE, crop=28, pad=2)
        for layer in self.net.layer:
            if layer.type == "SlimData" and layer.include[0].phase == pb.TEST:
                layer.transform_param.crop_size = 28
        return x

    def imagenet_data(self, train_batch: int = 32, test_batch: int = 50) -> str:
        """ILSVRC-2012 from LMDB, as in Caffe's ImageNet examples: 224x224 crops (random + flip in TRAIN)."""
        for phase, batch, source in ((pb.TRAIN, train_batch, "data/ilsvrc12_train_lmdb"),
                                     (pb.TEST, test_batch, "data/ilsvrc12_val_lmdb")):
            layer = self.layer("data", "Data", [], ["data", "label"])
            layer.include.add(phase=phase)
            layer.data_param.source = source
            layer.data_param.batch_size = batch
            layer.data_param.backend = pb.DataParameter.LMDB
            layer.transform_param.mirror = phase == pb.TRAIN
            layer.transform_param.crop_size = 224
            layer.transform_param.mean_value.extend(_IMAGENET_MEAN)
        self.channels["data"] = 3
        return "data"

    def loss(self, bottom: str, top5: bool = False) -> None:
        """SoftmaxWithLoss ``loss`` and the TEST-phase ``accuracy`` (and ``accuracy_top5`` for ImageNet)."""
        self.layer("loss", "SoftmaxWithLoss", [bottom, "label"], ["loss"])
        accuracy = self.layer("accuracy", "Accuracy", [bottom, "label"], ["accuracy"])
        accuracy.include.add(phase=pb.TEST)
        if top5:
            accuracy = self.layer("accuracy_top5", "Accuracy", [bottom, "label"], ["accuracy_top5"])
            accuracy.include.add(phase=pb.TEST)
            accuracy.accuracy_param.top_k = 5

    # -- parametric layers ------------------------------------------------------------------------------------

    @staticmethod
    def _bias_params(layer: pb.LayerParameter) -> None:
        # Caffe's custom: weights at the base rate with weight decay, biases at twice the rate without decay.
        layer.param.add(lr_mult=1, decay_mult=1)
        layer.param.add(lr_mult=2, decay_mult=0)

    def conv(self, name: str, bottom: str, num_output: int, kernel: int, stride: int = 1,
             pad: Optional[int] = None, group: int = 1, bias: bool = False, top: Optional[str] = None) -> str:
        """A Convolution; ``pad`` defaults to "same" for odd kernels. Bias-free unless ``bias`` (BatchNorm follows)."""
        top = top or name
        layer = self.layer(name, "Convolution", [bottom], [top])
        param = layer.convolution_param
        param.num_output = num_output
        param.kernel_size.append(kernel)
        pad = (kernel - 1) // 2 if pad is None else pad
        if pad:
            param.pad.append(pad)
        if stride != 1:
            param.stride.append(stride)
        if group != 1:
            param.group = group
        param.weight_filler.type = "msra"
        if bias:
            self._bias_params(layer)
            param.bias_filler.type = "constant"
        else:
            param.bias_term = False
        self.channels[top] = num_output
        return top

    def fc(self, name: str, bottom: str, num_output: int) -> str:
        """An InnerProduct with bias, xavier-initialised."""
        layer = self.layer(name, "InnerProduct", [bottom], [name])
        self._bias_params(layer)
        layer.inner_product_param.num_output = num_output
        layer.inner_product_param.weight_filler.type = "xavier"
        layer.inner_product_param.bias_filler.type = "constant"
        self.channels[name] = num_output
        return name

    def bn(self, bn_name: str, scale_name: str, bottom: str, top: Optional[str] = None,
           gamma: Optional[float] = None, moving_average_fraction: Optional[float] = None) -> str:
        """BatchNorm + Scale(bias_term: true), in place on ``bottom`` unless ``top`` names a new blob.

        A BatchNorm whose input is also read by another layer (a pre-activation block's input, which the shortcut
        adds back; a DenseNet block's concatenation, which the next Concat extends) must write a new blob: in place
        it would overwrite the input those layers read. ``gamma`` initialises the Scale layer's factors (Caffe's
        default filler for them is constant 1); ``moving_average_fraction`` overrides Caffe's 0.999.
        """
        top = top or bottom
        bn = self.layer(bn_name, "BatchNorm", [bottom], [top])
        if moving_average_fraction is not None:
            bn.batch_norm_param.moving_average_fraction = moving_average_fraction
        scale = self.layer(scale_name, "Scale", [top], [top])
        scale.scale_param.bias_term = True
        if gamma is not None:
            scale.scale_param.filler.type = "constant"
            scale.scale_param.filler.value = gamma
        self.channels[top] = self.channels[bottom]
        return top

    # -- parameter-free layers --------------------------------------------------------------------------------

    def relu(self, name: str, bottom: str) -> str:
        self.layer(name, "ReLU", [bottom], [bottom])
        return bottom

    def pool(self, name: str, bottom: str, method: int, kernel: int = 0, stride: int = 1,
             global_pool: bool = False, floor: bool = False, top: Optional[str] = None) -> str:
        """A Pooling layer (Caffe rounds the output size up unless ``floor``)."""
        top = top or name
        param = self.layer(name, "Pooling", [bottom], [top]).pooling_param
        param.pool = method
        if global_pool:
            param.global_pooling = True
        else:
            param.kernel_size = kernel
            param.stride = stride
        if floor:
            param.round_mode = pb.PoolingParameter.FLOOR
        self.channels[top] = self.channels[bottom]
        return top

    def dropout(self, name: str, bottom: str, ratio: float = 0.5) -> str:
        self.layer(name, "Dropout", [bottom], [bottom]).dropout_param.dropout_ratio = ratio
        return bottom

    def eltwise_sum(self, name: str, bottoms: Sequence[str]) -> str:
        self.layer(name, "Eltwise", bottoms, [name])
        self.channels[name] = self.channels[bottoms[0]]
        return name

    def concat(self, name: str, bottoms: Sequence[str]) -> str:
        self.layer(name, "Concat", bottoms, [name])
        self.channels[name] = sum(self.channels[b] for b in bottoms)
        return name

    def zeros_like(self, name: str, bottom: str) -> str:
        """A blob of zeros shaped like ``bottom``: Power with scale 0 computes (0 + 0 * x)^1 = 0 exactly."""
        self.layer(name, "Power", [bottom], [name]).power_param.scale = 0
        self.channels[name] = self.channels[bottom]
        return name


# ---------------------------------------------------------------------------------------------------------------
# VGG
# ---------------------------------------------------------------------------------------------------------------

#: Convolution widths per stage; "M" is a 2x2 max pooling. Keys are the depths of Simonyan & Zisserman's table 1.
VGG_CFGS: Dict[int, List[Union[int, str]]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def _vgg_features(b: _Builder, x: str, cfg: Sequence[Union[int, str]], batch_norm: bool, gamma: Optional[float],
                  final_pool: bool, moving_average_fraction: Optional[float] = None) -> str:
    """The convolution stages of a VGG cfg; layers are named conv{stage}_{i}, relu{stage}_{i}, pool{stage}."""
    stage, index = 1, 0
    for item in cfg:
        if item == "M":
            x = b.pool(f"pool{stage}", x, pb.PoolingParameter.MAX, 2, 2)
            stage, index = stage + 1, 0
            continue
        index += 1
        name = f"conv{stage}_{index}"
        x = b.conv(name, x, item, 3, bias=not batch_norm)
        if batch_norm:
            x = b.bn(f"{name}/bn", f"{name}/scale", x, gamma=gamma, moving_average_fraction=moving_average_fraction)
        x = b.relu(f"relu{stage}_{index}", x)
    if final_pool:
        x = b.pool(f"pool{stage}", x, pb.PoolingParameter.MAX, 2, 2)
    return x


def vgg_cifar(depth: int = 19, num_classes: int = 10) -> pb.NetParameter:
    """VGG with BatchNorm for 32x32 CIFAR images, network slimming's baseline (Liu et al. 2017).

    The cfg's four 2x2 max poolings take 32x32 to 2x2; a 2x2 average pooling then feeds one InnerProduct to the
    classes. No dropout. Scale factors start at 0.5, as in the paper's code.
    """
    dataset = {10: pb.SlimDataParameter.CIFAR10, 100: pb.SlimDataParameter.CIFAR100}[num_classes]
    b = _Builder(f"VGG{depth}_CIFAR{num_classes}")
    x = b.cifar_data(dataset)
    x = _vgg_features(b, x, VGG_CFGS[depth], batch_norm=True, gamma=0.5, final_pool=False)
    x = b.pool("pool5", x, pb.PoolingParameter.AVE, 2, 2)
    x = b.fc("fc", x, num_classes)
    b.loss(x)
    return b.net


def vgg16_imagenet(num_classes: int = 1000) -> pb.NetParameter:
    """VGG-16 for ImageNet as released in Caffe (Simonyan & Zisserman 2015): biases, no BatchNorm, FC 4096-4096
    with dropout 0.5. Layer names are those of the released VGG_ILSVRC_16_layers model, so its weights load."""
    b = _Builder("VGG_ILSVRC_16_layers")
    x = b.imagenet_data()
    x = _vgg_features(b, x, VGG_CFGS[16], batch_norm=False, gamma=None, final_pool=True)
    for index in (6, 7):
        x = b.fc(f"fc{index}", x, 4096)
        x = b.relu(f"relu{index}", x)
        x = b.dropout(f"drop{index}", x)
    x = b.fc("fc8", x, num_classes)
    b.loss(x, top5=True)
    return b.net


# The Fashion-MNIST nets train for a few thousand iterations (fine-tuning for a few hundred), where Caffe's
# moving_average_fraction of 0.999 averages the BatchNorm statistics over most of the run, stale weights included:
# measured on vgg7_fashion after 938 iterations, test accuracy 81.5% with those statistics against 86.1% with the
# test batches' own. 0.99 averages about the last hundred batches.
_FASHION_BN_FRACTION = 0.99

#: The Fashion-MNIST VGG's convolution widths: 28x28 -> 14x14 -> 7x7, two 3x3 convolutions per stage.
VGG7_FASHION_CFG: List[Union[int, str]] = [16, 16, "M", 32, 32, "M", 64, 64]


def vgg_fashion(cfg: Sequence[Union[int, str]] = tuple(VGG7_FASHION_CFG), num_classes: int = 10) -> pb.NetParameter:
    """A VGG-style net with BatchNorm for 28x28 grey Fashion-MNIST, sized to train on a 2-core CPU.

    Network slimming's VGG recipe (Liu et al. 2017) at small scale: 3x3 convolutions with BatchNorm + Scale (factors
    starting at 0.5, as the paper's code) in three stages of 16, 32 and 64 channels separated by 2x2 max poolings,
    then global average pooling and one InnerProduct. 7.3M conv+FC multiply-accumulates per image (`slim calflop`).
    BatchNorm's moving_average_fraction is 0.99 (see `_FASHION_BN_FRACTION`).
    """
    b = _Builder(f"VGG{sum(1 for v in cfg if v != 'M') + 1}_FashionMNIST")
    x = b.fashion_data()
    x = _vgg_features(b, x, cfg, batch_norm=True, gamma=0.5, final_pool=False,
                      moving_average_fraction=_FASHION_BN_FRACTION)
    x = b.pool("pool", x, pb.PoolingParameter.AVE, global_pool=True)
    x = b.fc("fc", x, num_classes)
    b.loss(x)
    return b.net


# ---------------------------------------------------------------------------------------------------------------
# ResNet for CIFAR
# ---------------------------------------------------------------------------------------------------------------

def _option_a_shortcut(b: _Builder, name: str, x: str) -> str:
    """He et al.'s parameter-free shortcut (option A) for a stage that halves the size and doubles the width.

    It keeps every second pixel and appends as many zero channels, in stock Caffe layers: a 1x1 max pooling with
    stride 2 subsamples (round_mode FLOOR: with Caffe's default CEIL rounding a 32-pixel side would give 17 rather
    than the branch's 16), and a Concat with a zero copy of the result (Power, scale 0) doubles the channels.
    """
    sub = b.pool(f"{name}/subsample", x, pb.PoolingParameter.MAX, 1, 2, floor=True)
    zeros = b.zeros_like(f"{name}/zeros", sub)
    return b.concat(f"{name}/shortcut", [sub, zeros])


def resnet_cifar(depth: int = 20, num_classes: int = 10) -> pb.NetParameter:
    """ResNet-(6n+2) for CIFAR with basic blocks, as in He et al. 2016 (section 4.2).

    A 3x3 convolution of 16 channels, three stages of n basic blocks (conv3x3-BN-ReLU-conv3x3-BN, added to the
    shortcut, then ReLU) of 16, 32 and 64 channels, the first block of stages 2 and 3 with stride 2 and an option-A
    shortcut, then global average pooling and one InnerProduct. Layers of block i of stage s are named
    ``res{s}_{i}/...``; the sum is ``res{s}_{i}``.
    """
    if depth < 8 or (depth - 2) % 6:
        raise NetError(f"A CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110, ...); got {depth}.")
    dataset = {10: pb.SlimDataParameter.CIFAR10, 100: pb.SlimDataParameter.CIFAR100}[num_classes]
    b = _Builder(f"ResNet{depth}_CIFAR{num_classes}")
    return _resnet_basic(b, b.cifar_data(dataset), depth, num_classes)


def resnet_fashion(depth: int = 20, num_classes: int = 10) -> pb.NetParameter:
    """He et al.'s CIFAR ResNet-(6n+2) (see `resnet_cifar`) on 28x28 grey Fashion-MNIST: stages at 28x28, 14x14 and
    7x7 (the option-A subsampling rounds down, as the strided convolutions do). BatchNorm's moving_average_fraction
    is 0.99, as vgg_fashion's."""
    if depth < 8 or (depth - 2) % 6:
        raise NetError(f"A CIFAR-style ResNet has depth 6n+2 (8, 14, 20, ...); got {depth}.")
    b = _Builder(f"ResNet{depth}_FashionMNIST")
    return _resnet_basic(b, b.fashion_data(), depth, num_classes, _FASHION_BN_FRACTION)


def _resnet_basic(b: _Builder, x: str, depth: int, num_classes: int,
                  moving_average_fraction: Optional[float] = None) -> pb.NetParameter:
    """The body of `resnet_cifar` after its data layer: conv1, three stages of basic blocks, pooling, classifier."""
    blocks = (depth - 2) // 6
    maf = moving_average_fraction
    x = b.conv("conv1", x, 16, 3)
    x = b.bn("conv1/bn", "conv1/scale", x, moving_average_fraction=maf)
    x = b.relu("conv1/relu", x)
    for stage, width in enumerate((16, 32, 64), start=2):
        for index in range(1, blocks + 1):
            name = f"res{stage}_{index}"
            stride = 2 if index == 1 and stage > 2 else 1
            shortcut = _option_a_shortcut(b, name, x) if stride == 2 else x
            y = b.conv(f"{name}/conv1", x, width, 3, stride)
            y = b.bn(f"{name}/conv1/bn", f"{name}/conv1/scale", y, moving_average_fraction=maf)
            y = b.relu(f"{name}/conv1/relu", y)
            y = b.conv(f"{name}/conv2", y, width, 3)
            y = b.bn(f"{name}/conv2/bn", f"{name}/conv2/scale", y, moving_average_fraction=maf)
            x = b.eltwise_sum(name, [y, shortcut])
            x = b.relu(f"{name}/relu", x)
    x = b.pool("pool", x, pb.PoolingParameter.AVE, global_pool=True)
    x = b.fc("fc", x, num_classes)
    b.loss(x)
    return b.net


def preresnet_bottleneck_cifar(depth: int = 164, num_classes: int = 10) -> pb.NetParameter:
    """Pre-activation ResNet-(9n+2) with bottleneck blocks for CIFAR (He et al. 2016, "Identity Mappings"), in the
    form network slimming prunes (Liu et al. 2017).

    A 3x3 convolution of 16 channels, then three stages of n blocks BN-ReLU-conv1x1(w)-BN-ReLU-conv3x3(w)-BN-ReLU-
    conv1x1(4w) with w = 16, 32, 64 (outputs 64, 128, 256); the 3x3 convolution carries the stride (2 in the first
    block of stages 2 and 3). The first block of each stage adds a 1x1 projection (no BatchNorm) of its input, the
    others the input itself. A final BN-ReLU, global average pooling and one InnerProduct. Scale factors start at
    0.5, as in the paper's code.
    """
    if depth < 11 or (depth - 2) % 9:
        raise NetError(f"A pre-activation bottleneck ResNet for CIFAR has depth 9n+2 (164, 1001, ...); got {depth}.")
    blocks = (depth - 2) // 9
    dataset = {10: pb.SlimDataParameter.CIFAR10, 100: pb.SlimDataParameter.CIFAR100}[num_classes]
    b = _Builder(f"PreResNet{depth}_CIFAR{num_classes}")
    x = b.cifar_data(dataset)
    x = b.conv("conv1", x, 16, 3)
    for stage, width in enumerate((16, 32, 64), start=2):
        for index in range(1, blocks + 1):
            name = f"res{stage}_{index}"
            stride = 2 if index == 1 and stage > 2 else 1
            # The block's input is read twice (here and by the shortcut), so its BatchNorm writes a new blob.
            y = b.bn(f"{name}/bn1", f"{name}/scale1", x, top=f"{name}/bn1", gamma=0.5)
            y = b.relu(f"{name}/relu1", y)
            y = b.conv(f"{name}/conv1", y, width, 1)
            y = b.bn(f"{name}/bn2", f"{name}/scale2", y, gamma=0.5)
            y = b.relu(f"{name}/relu2", y)
            y = b.conv(f"{name}/conv2", y, width, 3, stride)
            y = b.bn(f"{name}/bn3", f"{name}/scale3", y, gamma=0.5)
            y = b.relu(f"{name}/relu3", y)
            y = b.conv(f"{name}/conv3", y, 4 * width, 1)
            shortcut = x
            if index == 1:
                shortcut = b.conv(f"{name}/shortcut", x, 4 * width, 1, stride)
            x = b.eltwise_sum(name, [y, shortcut])
    x = b.bn("bn", "scale", x, gamma=0.5)
    x = b.relu("relu", x)
    x = b.pool("pool", x, pb.PoolingParameter.AVE, global_pool=True)
    x = b.fc("fc", x, num_classes)
    b.loss(x)
    return b.net


# ---------------------------------------------------------------------------------------------------------------
# DenseNet for CIFAR
# ---------------------------------------------------------------------------------------------------------------

def densenet_cifar(depth: int = 40, growth: int = 12, num_classes: int = 10) -> pb.NetParameter:
    """DenseNet for CIFAR without bottlenecks or compression (Huang et al. 2017), as network slimming prunes it.

    A 3x3 convolution of 16 channels, three dense blocks of (depth - 4) / 3 layers BN-ReLU-conv3x3(growth) whose
    output is concatenated to the block's running blob, transitions BN-ReLU-conv1x1 (same width)-2x2 average
    pooling between blocks, and a final BN-ReLU, global average pooling and InnerProduct. Scale factors start at
    0.5, as in the paper's code.
    """
    if (depth - 4) % 3:
        raise NetError(f"A CIFAR DenseNet has depth 3n+4 (40, 100, ...); got {depth}.")
    layers = (depth - 4) // 3
    dataset = {10: pb.SlimDataParameter.CIFAR10, 100: pb.SlimDataParameter.CIFAR100}[num_classes]
    b = _Builder(f"DenseNet{depth}_CIFAR{num_classes}")
    x = b.cifar_data(dataset)
    x = b.conv("conv1", x, 16, 3)
    for block in range(1, 4):
        for index in range(1, layers + 1):
            name = f"dense{block}_{index}"
            # x is also read by this layer's Concat: the BatchNorm writes a new blob.
            y = b.bn(f"{name}/bn", f"{name}/scale", x, top=f"{name}/bn", gamma=0.5)
            y = b.relu(f"{name}/relu", y)
            y = b.conv(f"{name}/conv", y, growth, 3)
            x = b.concat(f"{name}/concat", [x, y])
        name = f"trans{block}" if block < 3 else "final"
        x = b.bn(f"{name}/bn", f"{name}/scale", x, gamma=0.5)
        x = b.relu(f"{name}/relu", x)
        if block < 3:
            x = b.conv(f"{name}/conv", x, b.channels[x], 1)
            x = b.pool(f"{name}/pool", x, pb.PoolingParameter.AVE, 2, 2)
    x = b.pool("pool", x, pb.PoolingParameter.AVE, global_pool=True)
    x = b.fc("fc", x, num_classes)
    b.loss(x)
    return b.net


# ---------------------------------------------------------------------------------------------------------------
# ResNet for ImageNet, Caffe style
# ---------------------------------------------------------------------------------------------------------------

_RESNET_IMAGENET = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
                    101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}


def _block_letters(count: int) -> List[str]:
    # KaimingHe's naming: a, b, c, ... and, for stages of more than six blocks (ResNet-101/152), a, b1, b2, ...
    if count <= 6:
        return [chr(ord("a") + i) for i in range(count)]
    return ["a"] + [f"b{i}" for i in range(1, count)]


def resnet_imagenet(depth: int = 50, num_classes: int = 1000, stride_on_3x3: bool = False) -> pb.NetParameter:
    """ResNet-18/34/50/101/152 for ImageNet in KaimingHe's Caffe form (He et al. 2016).

    conv1 7x7/2 with BN, 3x3/2 max pooling, four stages (64, 128, 256, 512 base widths), 7x7 average pooling and
    fc1000. Convolutions have no bias; BatchNorm is BatchNorm + Scale. The first block of each stage has a 1x1
    projection shortcut (``branch1``) where the shape changes; the stride sits in the first convolution of
    ``branch2`` (the 1x1 ``branch2a`` of a bottleneck block, as in the released ResNet-50). Layer names are
    KaimingHe's (res2a_branch2a, bn2a_branch2a, scale2a_branch2a, res2a, ...), so the released weights load.
    ``stride_on_3x3`` moves a bottleneck's stride to the 3x3 ``branch2b`` (the "v1.5" layout of torchvision and
    most pruning papers: ResNet-50 then has 4.09 G conv+FC MACs instead of 3.86 G; the parameters are the same).
    """
    kind, counts = _RESNET_IMAGENET[depth]
    expansion = 4 if kind == "bottleneck" else 1
    b = _Builder(f"ResNet-{depth}")
    x = b.imagenet_data()
    x = b.conv("conv1", x, 64, 7, 2, pad=3)
    x = b.bn("bn_conv1", "scale_conv1", x)
    x = b.relu("conv1_relu", x)
    x = b.pool("pool1", x, pb.PoolingParameter.MAX, 3, 2)
    for stage, (count, width) in enumerate(zip(counts, (64, 128, 256, 512)), start=2):
        for index, letter in enumerate(_block_letters(count)):
            tag = f"{stage}{letter}"
            stride = 2 if index == 0 and stage > 2 else 1
            shortcut = x
            if b.channels[x] != width * expansion or stride != 1:
                shortcut = b.conv(f"res{tag}_branch1", x, width * expansion, 1, stride)
                shortcut = b.bn(f"bn{tag}_branch1", f"scale{tag}_branch1", shortcut)
            if kind == "bottleneck":
                first, second = (1, stride) if stride_on_3x3 else (stride, 1)
                convs = (("2a", width, 1, first), ("2b", width, 3, second), ("2c", 4 * width, 1, 1))
            else:
                convs = (("2a", width, 3, stride), ("2b", width, 3, 1))
            y = x
            for position, (branch, num_output, kernel, conv_stride) in enumerate(convs):
                y = b.conv(f"res{tag}_branch{branch}", y, num_output, kernel, conv_stride)
                y = b.bn(f"bn{tag}_branch{branch}", f"scale{tag}_branch{branch}", y)
                if position < len(convs) - 1:
                    y = b.relu(f"res{tag}_branch{branch}_relu", y)
            x = b.eltwise_sum(f"res{tag}", [shortcut, y])
            x = b.relu(f"res{tag}_relu", x)
    x = b.pool("pool5", x, pb.PoolingParameter.AVE, 7, 1)
    x = b.fc("fc1000" if num_classes == 1000 else "fc", x, num_classes)
    b.loss(x, top5=True)
    return b.net


# ---------------------------------------------------------------------------------------------------------------
# MobileNets
# ---------------------------------------------------------------------------------------------------------------

def _conv_bn(b: _Builder, name: str, x: str, num_output: int, kernel: int, stride: int = 1, group: int = 1,
             relu: Optional[str] = None) -> str:
    """conv + ``{name}/bn`` + ``{name}/scale`` (+ ReLU named ``relu``)."""
    x = b.conv(name, x, num_output, kernel, stride, group=group)
    x = b.bn(f"{name}/bn", f"{name}/scale", x)
    return b.relu(relu, x) if relu else x


def mobilenet_v1(num_classes: int = 1000) -> pb.NetParameter:
    """MobileNet v1 (Howard et al. 2017), width 1.0, 224x224: a 3x3/2 convolution of 32 channels, 13 depthwise
    separable blocks (a depthwise 3x3 Convolution with group = channels, then a 1x1), global average pooling and
    fc7. Layer names follow the widely used Caffe port (conv2_1/dw, conv2_1/sep, ...)."""
    # (pointwise width, depthwise stride) per block; the block names conv2_1 ... conv6 are the Caffe port's.
    blocks = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    names = ["2_1", "2_2", "3_1", "3_2", "4_1", "4_2", "5_1", "5_2", "5_3", "5_4", "5_5", "5_6", "6"]
    b = _Builder("MobileNet")
    x = b.imagenet_data()
    x = _conv_bn(b, "conv1", x, 32, 3, 2, relu="relu1")
    for tag, (width, stride) in zip(names, blocks):
        channels = b.channels[x]
        x = _conv_bn(b, f"conv{tag}/dw", x, channels, 3, stride, group=channels, relu=f"relu{tag}/dw")
        x = _conv_bn(b, f"conv{tag}/sep", x, width, 1, relu=f"relu{tag}/sep")
    x = b.pool("pool6", x, pb.PoolingParameter.AVE, global_pool=True)
    x = b.fc("fc7", x, num_classes)
    b.loss(x, top5=True)
    return b.net


def mobilenet_v2(num_classes: int = 1000) -> pb.NetParameter:
    """MobileNet v2 (Sandler et al. 2018), width 1.0, 224x224: inverted residual blocks (1x1 expansion, depthwise
    3x3, linear 1x1 projection; identity shortcut where stride is 1 and widths match), a final 1x1 convolution to
    1280 channels, global average pooling and fc7.

    The paper's ReLU6 is written as ReLU, as in the common Caffe port: BVLC has no ReLU6 (its Clip layer is not
    read by OpenCV), and the parameter count is the same. Blocks with expansion factor 1 have no expansion
    convolution, as in the paper's reference implementation.
    """
    # (expansion t, output channels c, repeats n, first stride s): the paper's table 2.
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    b = _Builder("MobileNetV2")
    x = b.imagenet_data()
    x = _conv_bn(b, "conv1", x, 32, 3, 2, relu="relu1")
    for stage, (expansion, width, repeats, first_stride) in enumerate(settings, start=2):
        for index in range(1, repeats + 1):
            name = f"conv{stage}_{index}"
            stride = first_stride if index == 1 else 1
            channels = b.channels[x]
            hidden = channels * expansion
            y = x
            if expansion != 1:
                y = _conv_bn(b, f"{name}/expand", y, hidden, 1, relu=f"relu{stage}_{index}/expand")
            y = _conv_bn(b, f"{name}/dwise", y, hidden, 3, stride, group=hidden, relu=f"relu{stage}_{index}/dwise")
            y = _conv_bn(b, f"{name}/linear", y, width, 1)
            x = b.eltwise_sum(f"block{stage}_{index}", [x, y]) if stride == 1 and channels == width else y
    x = _conv_bn(b, "conv9", x, 1280, 1, relu="relu9")
    x = b.pool("pool9", x, pb.PoolingParameter.AVE, global_pool=True)
    x = b.fc("fc7", x, num_classes)
    b.loss(x, top5=True)
    return b.net


# ---------------------------------------------------------------------------------------------------------------
# The demo net
# ---------------------------------------------------------------------------------------------------------------

def demo_digits() -> pb.NetParameter:
    """A small VGG-style net with BatchNorm for the built-in 8x8 grey digits, 10 classes, for ``slim demo``.

    conv 32-32, 2x2 max pooling, conv 64-64, 2x2 max pooling, conv 128, global average pooling, InnerProduct 10.
    Pixels (0..16) are scaled by 1/16; there is no augmentation (random crops of an 8x8 digit lose strokes). The
    test batch of 120 divides the 360 test digits (test_iter: 3 covers them once).

    A demo trains for a few hundred iterations only, where Caffe's moving_average_fraction of 0.999 leaves the
    running statistics an average over the whole run, stale weights included (its bias correction weighs early
    batches almost as much as late ones), and test accuracy lags or falls. 0.9 tracks the last ten or so batches.
    """
    b = _Builder("DemoDigits")
    x = b.slim_data(pb.SlimDataParameter.DIGITS, "", 64, 120, 1, (), 0.0625)
    x = _vgg_features(b, x, [32, 32, "M", 64, 64, "M", 128], batch_norm=True, gamma=None, final_pool=False,
                      moving_average_fraction=0.9)
    x = b.pool("pool3", x, pb.PoolingParameter.AVE, global_pool=True)
    x = b.fc("fc", x, 10)
    b.loss(x)
    return b.net


# ---------------------------------------------------------------------------------------------------------------
# The registry and nets/
# ---------------------------------------------------------------------------------------------------------------

_LIU = 'Liu et al., "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017'
_HE = 'He et al., "Deep Residual Learning for Image Recognition", CVPR 2016'

#: Name (the file name in nets/, without .prototxt) -> generator returning the train/test NetParameter.
ZOO: Dict[str, Callable[..., pb.NetParameter]] = {}
#: Name -> what the net is and the paper it follows, for the header of its file.
ABOUT: Dict[str, ZooInfo] = {}


def _register(name: str, generator: Callable[..., pb.NetParameter], title: str, paper: str, **kwargs) -> None:
    ZOO[name] = functools.partial(generator, **kwargs) if kwargs else generator
    ABOUT[name] = ZooInfo(title, paper)


for _classes in (10, 100):
    _register(f"vgg19_cifar{_classes}", vgg_cifar, f"VGG-19 with BatchNorm for CIFAR-{_classes}", _LIU,
              depth=19, num_classes=_classes)
for _classes in (10, 100):
    _register(f"resnet164_cifar{_classes}", preresnet_bottleneck_cifar,
              f"Pre-activation ResNet-164 (bottleneck, 16-64-128-256) for CIFAR-{_classes}",
              _LIU + '; He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016', depth=164,
              num_classes=_classes)
for _classes in (10, 100):
    _register(f"densenet40_cifar{_classes}", densenet_cifar,
              f"DenseNet-40 (growth 12, no compression) for CIFAR-{_classes}",
              _LIU + '; Huang et al., "Densely Connected Convolutional Networks", CVPR 2017', depth=40, growth=12,
              num_classes=_classes)
for _depth in (20, 32, 56, 110):
    _register(f"resnet{_depth}_cifar10", resnet_cifar,
              f"ResNet-{_depth} (basic blocks, parameter-free option-A shortcuts) for CIFAR-10",
              _HE + " (section 4.2)", depth=_depth)
_register("vgg16_imagenet", vgg16_imagenet, "VGG-16 for ImageNet (ILSVRC-2012)",
          'Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015; '
          'pruned by He et al., "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017')
_register("resnet50_imagenet", resnet_imagenet, "ResNet-50 for ImageNet (ILSVRC-2012), KaimingHe's Caffe layout",
          _HE + '; pruned by He et al., "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017',
          depth=50)
_register("resnet50v15_imagenet", resnet_imagenet,
          "ResNet-50 for ImageNet (ILSVRC-2012), v1.5 layout: the stride on the 3x3 (torchvision's; 4.09 GMACs)",
          _HE + "; the stride placement of torchvision's resnet50", depth=50, stride_on_3x3=True)
_register("resnet18_imagenet", resnet_imagenet, "ResNet-18 for ImageNet (ILSVRC-2012), Caffe layout", _HE,
          depth=18)
_register("mobilenet_v1_imagenet", mobilenet_v1, "MobileNet v1 (width 1.0) for ImageNet (ILSVRC-2012)",
          'Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications", '
          "arXiv:1704.04861, 2017")
_register("mobilenet_v2_imagenet", mobilenet_v2, "MobileNet v2 (width 1.0) for ImageNet (ILSVRC-2012)",
          'Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018')
_register("vgg7_fashion", vgg_fashion, "VGG-7 with BatchNorm (conv 16-16-32-32-64-64, FC) for Fashion-MNIST",
          _LIU + ' (its VGG recipe at small scale); Xiao et al., "Fashion-MNIST", arXiv:1708.07747')
_register("resnet20_fashion", resnet_fashion,
          "ResNet-20 (basic blocks, parameter-free option-A shortcuts) for Fashion-MNIST", _HE + " (section 4.2)",
          depth=20)
_register("demo_digits", demo_digits, "The demo net: a small VGG-style net with BatchNorm for the built-in 8x8 "
          "digits", "network slimming's VGG recipe (Liu et al., ICCV 2017) at toy scale")


def zoo_header(name: str, net: pb.NetParameter, deploy: bool = False) -> str:
    """The comment that heads a zoo file: what the net is, its input, its learnable parameters and its paper.

    The input and the parameter count are computed from the net's deploy form, never typed in, so the header
    cannot drift from the layers below it. (The deploy net has the same learnable blobs, and its graph needs no
    dataset: a Data layer reads its LMDB to learn the image shape.)
    """
    about = ABOUT[name]
    deploy_net = make_deploy(net)
    graph = build_graph(deploy_net, phase="TEST")
    inputs = deploy_net.layer[0]
    shapes = ", ".join(f"{top} {'x'.join(str(d) for d in shape.dim[1:])}"
                       for top, shape in zip(inputs.top, inputs.input_param.shape))
    what = (f"deploy net (nets/{name}.prototxt without data, loss and accuracy layers, by slim.deploy.make_deploy)"
            if deploy else "train/test net")
    lines = [f"{about.title}: {what}.",
             f"Input: {shapes} (channels x height x width).",
             f"Learnable parameters: {graph.param_count:,} (BatchNorm running statistics excluded).",
             f"Follows: {about.paper}.",
             "Generated by `python tools/zoo.py` from slim/zoo.py; edit the generator, not this file."]
    return "".join(textwrap.fill(line, 118, initial_indent="# ", subsequent_indent="#   ") + "\n" for line in lines)


def render_zoo(names: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The text of every zoo file (or those of the nets named): ``<name>.prototxt`` and ``<name>_deploy.prototxt``.

    Args:
        names: zoo names; all of ``ZOO`` by default.

    Returns:
        File name -> prototxt text (header comment first), in registry order.

    Raises:
        SlimError: a name is not in the zoo.
    """
    unknown = sorted(set(names or ()) - set(ZOO))
    if unknown:
        raise SlimError(f"Unknown zoo net(s) {', '.join(unknown)}; the zoo has {', '.join(sorted(ZOO))}.")
    files = {}
    for name in names or ZOO:
        net = ZOO[name]()
        files[f"{name}.prototxt"] = zoo_header(name, net) + net_to_text(net)
        files[f"{name}_deploy.prototxt"] = zoo_header(name, net, deploy=True) + net_to_text(make_deploy(net))
    return files


def write_zoo(out_dir: Union[str, Path] = "nets", names: Optional[Sequence[str]] = None) -> List[Path]:
    """Write every zoo net (or those named) and its deploy net into ``out_dir``, atomically, file by file.

    Args:
        out_dir: the folder to write into; created if missing.
        names: zoo names to write; all of ``ZOO`` by default.

    Returns:
        The paths written, in order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in render_zoo(names).items():
        with atomic_write(out_dir / file_name, "w") as f:
            f.write(text)
        written.append(out_dir / file_name)
    return written


def stale_zoo_files(out_dir: Union[str, Path] = "nets") -> List[str]:
    """Names of the zoo files in ``out_dir`` that are missing or differ from what the generators produce now."""
    out_dir = Path(out_dir)
    return [file_name for file_name, text in render_zoo().items()
            if not (out_dir / file_name).is_file() or (out_dir / file_name).read_text(encoding="utf-8") != text]
