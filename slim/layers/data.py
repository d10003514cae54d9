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

__all__ = ["Input", "DummyData", "Data", "ImageData", "MemoryData", "SlimData"]


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

    def macs(self):
        return 0  # the caller's tensors enter the net: no arithmetic


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

    def macs(self):
        return 0  # filling tops is data production, not a net operation (as for every data layer)


class _SourceLayer(Layer):
    """A layer backed by a slim.data BatchSource, attached by the Net (``attach``) before the first forward.

    Top shapes come from ``slim.data.infer_top_shapes``, which reads a file only where the parameters do not fix
    the shape (no torch needed), and assumes one where the data is absent and crop_size fixes the size.
    """

    num_bottoms = (0, 0)
    num_tops = (1, 2)
    is_data = True

    def setup(self):
        from slim.data import infer_top_shapes
        self.source = None
        self.device = None
        # Where the data is not on this machine and crop_size fixes the image size, the shape is assumed as
        # slim.data.sample_shape says; ``attach`` checks the real source before any training.
        self.top_shapes = [tuple(s) for s in infer_top_shapes(self.param)][:len(self.param.top)]

    def attach(self, rank: int, world_size: int, seed, device):
        """Open the source for one process of a (possibly distributed) run and check its shapes."""
        from slim.data import open_source
        self.source = open_source(self.param, phase=self.phase, rank=rank, world_size=world_size, seed=seed)
        if [tuple(s) for s in self.source.top_shapes[:len(self.top_shapes)]] != self.top_shapes:
            raise self.error(f"the data source yields shapes {self.source.top_shapes}, the net was built for "
                             f"{self.top_shapes}; check crop_size, new_height/new_width and is_color")
        self.device = device

    def forward(self, blobs, bottoms):
        if self.source is None:
            raise self.error("no data source is attached; build the net with slim.Net, which opens it")
        return self.source.next_batch(self.device or "cpu")[:len(self.param.top)]

    def macs(self):
        return 0  # reading and transforming data happens outside the net's arithmetic


@register
class SlimData(_SourceLayer):
    """A standard dataset read without conversion (slim_data_param): digits, CIFAR-10/100, SVHN, image folders,
    MNIST-format IDX files."""

    type = "SlimData"


@register
class Data(_SourceLayer):
    """Caffe's Data layer: Datum records from an LMDB (the optional lmdb package)."""

    type = "Data"


@register
class ImageData(_SourceLayer):
    """Caffe's ImageData layer: a list file of "path label" lines, images decoded with Pillow."""

    type = "ImageData"


@register
class MemoryData(_SourceLayer):
    """Caffe's MemoryData layer: batches of arrays handed over from Python (``net.set_input_arrays``)."""

    type = "MemoryData"
