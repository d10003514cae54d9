"""Datasets and data layers: where a net's images and labels come from.

`open_source` turns a data layer's LayerParameter into a `BatchSource`, which yields [data, label] batches on
the training device with Caffe's transform (crop, mirror, mean, scale; plus slim's pad) applied to the whole
batch there. Layer types:

=============  ===================================================================================================
SlimData       slim_data_param: DIGITS (built in), CIFAR10, CIFAR100, SVHN, IMAGE_FOLDER, IDX (MNIST format);
               shuffled by default.
Data           data_param: Datum records in LMDB (``pip install slim[lmdb]``), read in key order.
ImageData      image_data_param: a list file of ``path label`` lines; ``shuffle`` reshuffles every epoch.
MemoryData     memory_data_param: arrays given from Python with ``source.set_data(data, labels)``.
=============  ===================================================================================================

Every check that can fail on user input (missing files, malformed lists or records, labels out of range, a
crop larger than the images) runs when the source is opened, before training. `sample_shape` and
`infer_top_shapes` give the shapes from the layer and at most a header or first record, with numpy only (the one
source of them: the data layers and deploy nets use it); nothing here imports torch until a batch is made.

Channel order: Data, ImageData (and encoded Datum records) are BGR, as Caffe reads them through OpenCV; the
standard datasets of SlimData keep their own RGB order (mean_value lists follow the same order).
"""

import warnings

from slim import proto as pb
from slim.data.source import DEFAULT_SEED, ArraySamples, BatchSource, MemoryDataSource, Samples, derive_seed
from slim.data.transform import TransformSpec, build_transform, transform_output_shape
from slim.errors import DataError

__all__ = ["open_source", "infer_top_shapes", "sample_shape", "layer_batch_size", "BatchSource", "MemoryDataSource",
           "Samples", "ArraySamples", "TransformSpec", "DATA_LAYER_TYPES", "DEFAULT_SEED"]

DATA_LAYER_TYPES = ("SlimData", "Data", "ImageData", "MemoryData")

_CLASSES = {pb.SlimDataParameter.CIFAR10: 10, pb.SlimDataParameter.CIFAR100: 100}


def _where(layer: pb.LayerParameter) -> str:
    return f'Layer "{layer.name}" ({layer.type})'


def _check_type(layer: pb.LayerParameter) -> None:
    if layer.type not in DATA_LAYER_TYPES:
        raise DataError(f"{_where(layer)} is not a data layer slim can read; the data layer types are "
                        f"{', '.join(DATA_LAYER_TYPES)}.")


def _batch_size(layer: pb.LayerParameter, param_name: str) -> int:
    param = getattr(layer, param_name)
    if param.batch_size <= 0:
        raise DataError(f"{_where(layer)}: {param_name}.batch_size is not set; give the number of images per batch "
                        f"(and per process), e.g. `{param_name} {{ batch_size: 64 }}`.")
    return int(param.batch_size)


def _warn_deprecated(layer: pb.LayerParameter, param_name: str) -> None:
    # Caffe moved these into transform_param; its V1 upgrade moves them, but in a V2 layer Caffe ignores them.
    param = getattr(layer, param_name)
    old = [f for f in ("scale", "mean_file", "crop_size", "mirror") if param.HasField(f)]
    if old:
        warnings.warn(f"{_where(layer)}: {param_name} sets {', '.join(old)}, which Caffe ignores in this place; "
                      "move them into transform_param.", stacklevel=3)


def _samples(layer: pb.LayerParameter, *, headers: bool) -> Samples:
    """The layer's dataset. ``headers=False`` reads as little as the shape needs (open_source passes True)."""
    where = _where(layer)
    if layer.type == "SlimData":
        from slim.data import cifar, digits, folder, svhn

        p = layer.slim_data_param
        if p.dataset == pb.SlimDataParameter.DIGITS:
            return digits.load_digits(p.train)
        if p.dataset == pb.SlimDataParameter.IDX:  # before the source check: image_file/label_file need none
            from slim.data.idx import open_idx

            return open_idx(p, where=where, headers=headers)
        if not p.source:
            raise DataError(f"{where}: slim_data_param.source is not set; give the folder of the "
                            f"{pb.SlimDataParameter.Dataset.Name(p.dataset)} dataset.")
        if p.dataset in _CLASSES:
            return cifar.load_cifar(p.source, _CLASSES[p.dataset], p.train, where=where)
        if p.dataset == pb.SlimDataParameter.SVHN:
            return svhn.load_svhn(p.source, p.train, where=where)
        return folder.open_image_folder(p, where=where, headers=headers)
    if layer.type == "Data":
        from slim.data.lmdb_source import open_lmdb

        return open_lmdb(layer, where=where, list_keys=headers)
    if layer.type == "ImageData":
        from slim.data.folder import open_image_data

        return open_image_data(layer.image_data_param, where=where, headers=headers)
    raise AssertionError(layer.type)


def _stated_raw_shape(layer: pb.LayerParameter) -> tuple[int, int, int] | None:
    """(C, H, W) before the transform where the layer's parameters state it; None where only the data tells."""
    if layer.type == "MemoryData":
        p = layer.memory_data_param
        shape = (int(p.channels), int(p.height), int(p.width))
        if min(shape) <= 0:
            raise DataError(f"{_where(layer)}: memory_data_param must set channels, height and width (found "
                            f"{shape[0]}, {shape[1]}, {shape[2]}).")
        return shape
    if layer.type == "SlimData":
        from slim.data.cifar import CIFAR_SHAPE
        from slim.data.digits import DIGITS_SHAPE
        from slim.data.svhn import SVHN_SHAPE

        p = layer.slim_data_param
        fixed = {pb.SlimDataParameter.DIGITS: DIGITS_SHAPE, pb.SlimDataParameter.CIFAR10: CIFAR_SHAPE,
                 pb.SlimDataParameter.CIFAR100: CIFAR_SHAPE, pb.SlimDataParameter.SVHN: SVHN_SHAPE}
        if p.dataset in fixed:
            return fixed[p.dataset]
        if p.new_height and p.new_width:
            return 3, int(p.new_height), int(p.new_width)
    if layer.type == "ImageData":
        p = layer.image_data_param
        if p.new_height and p.new_width:
            return 3 if p.is_color else 1, int(p.new_height), int(p.new_width)
    return None


def _channels(layer: pb.LayerParameter) -> int:
    """The channel count of a layer's images as far as its parameters tell: ImageData's is_color decides, image
    folders are read in colour; IDX files are grey; a Data layer's records are assumed colour unless force_gray is
    set."""
    if layer.type == "SlimData" and layer.slim_data_param.dataset == pb.SlimDataParameter.IDX:
        return 1
    if layer.type == "ImageData":
        return 3 if layer.image_data_param.is_color else 1
    if layer.type == "Data":
        return 1 if layer.transform_param.force_gray else 3
    return 3


def sample_shape(layer: pb.LayerParameter) -> tuple[int, int, int]:
    """The (C, H, W) of one sample of a data layer, without loading its dataset and without torch.

    Standard datasets, MemoryData and resized image layers need no file; otherwise the first image header or the
    first LMDB record is read. Where that fails (the data is not on this machine: calflop or a deploy net derived
    from a train_val net) and transform_param.crop_size fixes the height and width, the shape is C x crop x crop,
    with C from the parameters (a Data layer's records are assumed colour unless force_gray is set), as the net is
    then built for it; ``open_source`` checks the real data before any training.

    Raises:
        DataError: the layer is not a data layer, its transform does not fit the images, or the image size is
            neither in the prototxt nor readable from the data.
    """
    _check_type(layer)
    transform = layer.transform_param
    raw = _stated_raw_shape(layer)
    if raw is None:
        try:
            raw = tuple(_samples(layer, headers=False).shape)
        except DataError:
            if not transform.crop_size:
                raise
            return _channels(layer), int(transform.crop_size), int(transform.crop_size)
    return transform_output_shape(transform, raw, where=_where(layer))


def layer_batch_size(layer: pb.LayerParameter) -> int:
    """The batch size of a data layer (per process), from its parameter message.

    Raises:
        DataError: the layer is not a data layer, or its batch_size is not set.
    """
    _check_type(layer)
    param_name = {"SlimData": "slim_data_param", "Data": "data_param", "ImageData": "image_data_param",
                  "MemoryData": "memory_data_param"}[layer.type]
    return _batch_size(layer, param_name)


def infer_top_shapes(layer: pb.LayerParameter) -> list[tuple[int, ...]]:
    """The top shapes [(N, C, H, W), (N,)] of a data layer: the batch size and ``sample_shape``.

    Raises:
        DataError: the layer is not a data layer, lacks a batch size, or ``sample_shape`` fails.
    """
    batch = layer_batch_size(layer)
    return [(batch,) + sample_shape(layer), (batch,)]


def open_source(layer: pb.LayerParameter, *, phase: int, rank: int = 0, world_size: int = 1,
                seed: int | None = None) -> BatchSource:
    """Opens the data a layer reads and checks it, ready to make batches.

    Args:
        layer: a SlimData, Data, ImageData or MemoryData layer.
        phase: pb.TRAIN or pb.TEST; decides random (TRAIN) or center (TEST) crops.
        rank: this process among ``world_size``; each reads its shard of every epoch. MemoryData is not sharded.
            (Caffe's test nets read all their data on every process: pass world_size=1 to do the same.)
        world_size: number of processes.
        seed: the solver's random seed, the same on all processes (None: DEFAULT_SEED). Sample order comes from
            (seed, epoch); transform draws from (seed, rank, epoch, position).

    Returns:
        The layer's BatchSource (a MemoryDataSource for MemoryData).

    Raises:
        DataError: the layer or its data is unusable; the message names the layer, the file and how to fix it.
    """
    _check_type(layer)
    where = _where(layer)
    seed = DEFAULT_SEED if seed is None else int(seed)
    if layer.type == "MemoryData":
        if layer.HasField("transform_param"):
            raise DataError(f"{where}: MemoryData does not transform the arrays it is given (Caffe refuses a "
                            "transform_param here too). Remove transform_param and preprocess the arrays.")
        return MemoryDataSource(layer.name, _stated_raw_shape(layer), _batch_size(layer, "memory_data_param"),
                                phase=phase)
    param_name = {"SlimData": "slim_data_param", "Data": "data_param", "ImageData": "image_data_param"}[layer.type]
    batch = _batch_size(layer, param_name)
    if layer.type != "SlimData":
        _warn_deprecated(layer, param_name)
    samples = _samples(layer, headers=True)
    transform = build_transform(layer.transform_param, phase=phase, in_shape=tuple(samples.shape), where=where)
    if layer.type == "SlimData":
        shuffle, rand_skip = layer.slim_data_param.shuffle, 0
    elif layer.type == "ImageData":
        shuffle, rand_skip = layer.image_data_param.shuffle, layer.image_data_param.rand_skip
    else:  # Caffe's Data layer reads its database sequentially
        shuffle, rand_skip = False, layer.data_param.rand_skip
    # Caffe's rand_skip: skip a random number of samples, below rand_skip, at the very start.
    skip = derive_seed(seed, 0x5C1B) % rand_skip if rand_skip else 0
    return BatchSource(layer.name, samples, transform, batch, shuffle=shuffle, seed=seed, rank=rank,
                       world_size=world_size, skip=skip)
