"""Layers that produce the net's data: Input, DummyData, and the dataset-backed Data, ImageData, MemoryData and
SlimData (whose reading, shuffling, sharding and transforms live in slim.data).

Shapes are inferred without reading a dataset where the parameters determine them (SlimData's datasets have known
image shapes; crop_size or new_height/new_width fix the rest); otherwise the source is opened to read its first
record, as Caffe does.
"""

from slim import proto as pb
from slim.layers._lazy import torch
from slim.layers.base import Layer, register
from slim.layers.fillers import fill

__all__ = ["Input", "DummyData", "Data", "ImageData", "MemoryData", "SlimData", "DATASET_SHAPES"]

# (channels, height, width) of each SlimData dataset's images.
DATASET_SHAPES = {
    pb.SlimDataParameter.DIGITS: (1, 8, 8),
    pb.SlimDataParameter.CIFAR10: (3, 32, 32),
    pb.SlimDataParameter.CIFAR100: (3, 32, 32),
    pb.SlimDataParameter.SVHN: (3, 32, 32),
}


@register
class Input(Layer):
    """Net inputs, fed by the caller: input_param.shape gives one shape per top, or one shared by all tops."""

    type = "Input"
    num_bottoms = (0, 0)
    num_tops = (1, None)
    is_data = True

    def setup(self):
        shapes = [tuple(s.dim) for s in self.param.input_param.shape]
        tops = len(self.param.top)
        if len(shapes) not in (1, tops):
            raise ValueError(f"input_param has {len(shapes)} shapes for {tops} tops; give one per top or one for all")
        if any(d < 0 for s in shapes for d in s):
            raise ValueError(f"input shapes must not be negative, found {shapes}")
        self.top_shapes = shapes * tops if len(shapes) == 1 else shapes

    def forward(self, blobs, bottoms):
        raise AssertionError("Input tops are fed by Net.forward")


@register
class DummyData(Layer):
    """Tops filled by data_filler (one filler for all tops, or one per top; none means constant 0). Constant tops
    are filled once; random ones are refilled on every forward, as Caffe does."""

    type = "DummyData"
    num_bottoms = (0, 0)
    num_tops = (1, None)
    is_data = True

    def setup(self):
        dp = self.param.dummy_data_param
        tops = len(self.param.top)
        legacy = len(dp.num) or len(dp.channels) or len(dp.height) or len(dp.width)
        if legacy:
            if dp.shape:
                raise ValueError("give shape or num/channels/height/width, not both")
            fields = [list(dp.num), list(dp.channels), list(dp.height), list(dp.width)]
            if any(len(f) not in (1, tops) for f in fields):
                raise ValueError("num, channels, height and width need one value each, or one per top")
            shapes = [tuple(f[i if len(f) > 1 else 0] for f in fields) for i in range(tops)]
        else:
            shapes = [tuple(s.dim) for s in dp.shape]
            if len(shapes) not in (1, tops):
                raise ValueError(f"{len(shapes)} shapes for {tops} tops; give one per top or one for all")
            shapes = shapes * tops if len(shapes) == 1 else shapes
        if len(dp.data_filler) not in (0, 1, tops):
            raise ValueError(f"{len(dp.data_filler)} data_filler entries for {tops} tops; give 0, 1 or one per top")
        self.top_shapes = shapes
        self._cache = {}
        self.generator = None

    def forward(self, blobs, bottoms):
        dp = self.param.dummy_data_param
        tops = []
        for i, shape in enumerate(self.top_shapes):
            filler = dp.data_filler[i if len(dp.data_filler) > 1 else 0] if dp.data_filler else pb.FillerParameter()
            device = self.device if getattr(self, "device", None) is not None else "cpu"
            if filler.type == "constant":
                if i not in self._cache:
                    self._cache[i] = fill(filler, shape, None).to(device)
                tops.append(self._cache[i])
            else:
                if self.generator is None:
                    self.generator = torch.Generator().manual_seed(0)
                tops.append(fill(filler, shape, self.generator, f"layer {self.name!r}").to(device))
        return tops


class _SourceLayer(Layer):
    """A layer backed by a slim.data BatchSource, attached by the Net (``attach``) before the first forward."""

    num_bottoms = (0, 0)
    num_tops = (1, 2)
    is_data = True

    def setup(self):
        self.source = None
        self.device = None
        shapes = self._shapes_from_params()
        if shapes is None:
            shapes = [tuple(s) for s in self.open().top_shapes]
        self.top_shapes = shapes[:len(self.param.top)]

    def _shapes_from_params(self):
        """(N, C, H, W) and (N,) when the parameters determine them, else None."""
        return None

    def open(self, rank: int = 0, world_size: int = 1, seed=None):
        """Open (once) and return this layer's BatchSource."""
        if self.source is None:
            from slim.data import open_source
            self.source = open_source(self.param, phase=self.phase, rank=rank, world_size=world_size, seed=seed)
        return self.source

    def attach(self, rank: int, world_size: int, seed, device):
        """Open the source for one process of a (possibly distributed) run and check its shapes."""
        self.source = None
        src = self.open(rank, world_size, seed)
        if [tuple(s) for s in src.top_shapes[:len(self.top_shapes)]] != self.top_shapes:
            raise self.error(f"the data source yields shapes {src.top_shapes}, the net was built for "
                             f"{self.top_shapes}; check crop_size, new_height/new_width and is_color")
        self.device = device

    def forward(self, blobs, bottoms):
        if self.source is None:
            raise self.error("no data source is attached; build the net with slim.Net, which opens it")
        return self.source.next_batch(self.device)[:len(self.param.top)]


def _image_shape(batch, channels, height, width, crop):
    if crop:
        height = width = crop
    return [(batch, channels, height, width), (batch,)]


@register
class SlimData(_SourceLayer):
    """A standard dataset read without conversion (slim_data_param): digits, CIFAR-10/100, SVHN, image folders."""

    type = "SlimData"

    def _shapes_from_params(self):
        sp = self.param.slim_data_param
        if sp.batch_size <= 0:
            raise ValueError("slim_data_param.batch_size must be positive")
        crop = self.param.transform_param.crop_size
        if sp.dataset in DATASET_SHAPES:
            return _image_shape(sp.batch_size, *DATASET_SHAPES[sp.dataset], crop)
        if crop or (sp.new_height and sp.new_width):
            return _image_shape(sp.batch_size, 3, sp.new_height, sp.new_width, crop)
        return None


@register
class Data(_SourceLayer):
    """Caffe's Data layer: Datum records from an LMDB (the optional lmdb package)."""

    type = "Data"

    def _shapes_from_params(self):
        dp, tp = self.param.data_param, self.param.transform_param
        if dp.batch_size <= 0:
            raise ValueError("data_param.batch_size must be positive")
        if tp.crop_size:
            return _image_shape(dp.batch_size, 1 if tp.force_gray else 3, 0, 0, tp.crop_size)
        return None


@register
class ImageData(_SourceLayer):
    """Caffe's ImageData layer: a list file of "path label" lines, images decoded with Pillow."""

    type = "ImageData"

    def _shapes_from_params(self):
        ip, tp = self.param.image_data_param, self.param.transform_param
        channels = 3 if ip.is_color else 1
        if tp.crop_size:
            return _image_shape(ip.batch_size, channels, 0, 0, tp.crop_size)
        if ip.new_height and ip.new_width:
            return _image_shape(ip.batch_size, channels, ip.new_height, ip.new_width, 0)
        return None


@register
class MemoryData(_SourceLayer):
    """Caffe's MemoryData layer: batches of arrays handed over from Python (``net.set_input_arrays``)."""

    type = "MemoryData"

    def _shapes_from_params(self):
        mp = self.param.memory_data_param
        if min(mp.batch_size, mp.channels, mp.height, mp.width) <= 0:
            raise ValueError("memory_data_param needs positive batch_size, channels, height and width")
        return _image_shape(mp.batch_size, mp.channels, mp.height, mp.width, self.param.transform_param.crop_size)
