"""Tests of slim.io.binary, the streaming codec for .caffemodel, .solverstate and .binaryproto.

The reference for every read is protobuf's own parse of the same bytes, with Caffe's BlobProto rules applied by
``_caffe_blob`` below; the reference for every write is protobuf's own serialisation. OpenCV's Caffe importer is
an independent reader of what slim writes.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from slim import proto as pb
from slim.errors import NetError, ParseError, WeightsError
from slim.io import binary
from slim.io.binary import (CaffeModel, LayerBlobs, read_blobproto, read_caffemodel, read_solverstate,
                            write_blobproto, write_caffemodel, write_solverstate)

TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"


# ----------------------------------------------------------------------------------------------------------------
# Reference helpers: protobuf builds and parses; Caffe's rules are restated here from REFERENCE.md.


def _pb_blob(array, legacy: bool = False, double: bool = False):
    """A BlobProto built by protobuf: shape or legacy 4-D dims, data or double_data."""
    array = np.asarray(array)
    blob = pb.BlobProto()
    if legacy:
        dims = (1,) * (4 - array.ndim) + array.shape
        blob.num, blob.channels, blob.height, blob.width = dims
    elif array.ndim:
        blob.shape.dim.extend(array.shape)
    (blob.double_data if double else blob.data).extend(array.ravel().tolist())
    return blob


def _caffe_blob(blob) -> tuple:
    """Caffe's Blob::FromProto rules over a protobuf-parsed BlobProto: (array, legacy)."""
    legacy = any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
    shape = [blob.num, blob.channels, blob.height, blob.width] if legacy else list(blob.shape.dim)
    values = np.array(blob.double_data, np.float64) if len(blob.double_data) else np.array(blob.data, np.float32)
    return values.reshape(shape), legacy


def _same(a, b) -> bool:
    """Equal in dtype, shape and every bit (NaN payloads and -0.0 included)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _all_same(got, want) -> bool:
    got, want = list(got), list(want)
    return len(got) == len(want) and all(map(_same, got, want))


def _net(*layers):
    net = pb.NetParameter(name="t")
    for name, type_ in layers:
        net.layer.add(name=name, type=type_, bottom=["x"], top=["x"])
    return net


def _varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def _ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field, encoded by hand."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _unpacked_floats(number: int, values, dtype: str) -> bytes:
    """Repeated fixed-size values written unpacked: one tag per value."""
    wire = 5 if dtype == "<f4" else 1
    return b"".join(_varint(number << 3 | wire) + np.array([v], dtype).tobytes() for v in values)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------------------------
# .caffemodel: round trip, byte-exact writes, reading protobuf's files


def test_round_trip_is_bit_exact(tmp_path, rng):
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], np.float32)
    blobs = {
        "conv": [rng.standard_normal((4, 3, 3, 3), dtype=np.float32), rng.standard_normal(4, dtype=np.float32)],
        "scale": [np.float32(2.5), special],     # a 0-axis blob
        "empty": [np.zeros((0, 3), np.float32)],  # count 0
        "ip": [rng.standard_normal((5, 7)), np.arange(5)],  # float64 and int64: stored as float32
    }
    net = _net(("conv", "Convolution"), ("relu", "ReLU"), ("scale", "Scale"), ("empty", "Parameter"),
               ("ip", "InnerProduct"))
    path = tmp_path / "m.caffemodel"
    write_caffemodel(path, net, blobs)
    model = read_caffemodel(path)

    assert isinstance(model, CaffeModel) and model.path == str(path)
    assert [(layer.name, layer.type) for layer in model.layers] == [(l.name, l.type) for l in net.layer]
    assert model.net == net  # the structure, without blobs
    got = model.blobs_by_name()
    assert got["relu"].blobs == [] and got["relu"].legacy_shape == []
    for name, values in blobs.items():
        assert got[name].legacy_shape == [False] * len(values)
        for stored, original in zip(got[name].blobs, values):
            assert _same(stored, np.asarray(original, np.float32))
    assert got["scale"].blobs[0].shape == ()
    assert not got["conv"].blobs[0].flags.writeable  # a view into the file mapping

    copied = read_caffemodel(path, copy=True)
    for view_layer, copy_layer in zip(model.layers, copied.layers):
        assert _all_same(copy_layer.blobs, view_layer.blobs)
        assert all(b.flags.writeable and b.flags.aligned for b in copy_layer.blobs)


def test_keep_double_stores_double_data(tmp_path, rng):
    weight = rng.standard_normal((3, 2))
    path = tmp_path / "d.caffemodel"
    write_caffemodel(path, _net(("ip", "InnerProduct")), {"ip": [weight, np.float64(1.5)]}, keep_double=True)
    parsed = pb.NetParameter.FromString(path.read_bytes())
    assert len(parsed.layer[0].blobs[0].data) == 0 and len(parsed.layer[0].blobs[0].double_data) == 6
    blobs = read_caffemodel(path).layers[0].blobs
    assert _same(blobs[0], weight) and _same(blobs[1], np.float64(1.5))


def test_written_bytes_equal_protobuf_serialisation(tmp_path, rng):
    net = text_format.Parse("""
        name: "n" input: "data" input_dim: [1, 3, 4, 4] force_backward: true
        layer { name: "c" type: "Convolution" bottom: "data" top: "c" param { lr_mult: 1 } param { lr_mult: 2 }
                include { phase: TEST } convolution_param { num_output: 2 kernel_size: 3 } }
        layer { name: "p" type: "PReLU" bottom: "c" top: "c" prelu_param { channel_shared: true } }
        layer { name: "no_blobs" type: "ReLU" bottom: "c" top: "c" }
    """, pb.NetParameter())
    blobs = {"c": [rng.standard_normal((2, 3, 3, 3), dtype=np.float32), rng.standard_normal(2, dtype=np.float32)],
             "p": [np.float32(0.25)]}
    path = tmp_path / "m.caffemodel"
    write_caffemodel(path, net, blobs)

    reference = pb.NetParameter()
    reference.CopyFrom(net)
    for layer in reference.layer:
        layer.blobs.extend(_pb_blob(b) for b in blobs.get(layer.name, ()))
    assert path.read_bytes() == reference.SerializeToString()

    parsed = pb.NetParameter.FromString(path.read_bytes())
    assert not parsed.layer[1].blobs[0].HasField("shape")  # 0-axis: no empty shape {} (it crashes OpenCV)
    for layer in parsed.layer:
        got = [_caffe_blob(b)[0] for b in layer.blobs]
        assert _all_same(got, blobs.get(layer.name, ()))


def test_blobs_already_in_net_are_replaced(tmp_path):
    net = _net(("ip", "InnerProduct"))
    net.layer[0].blobs.add().data.extend([1, 2, 3])
    path = tmp_path / "m.caffemodel"
    write_caffemodel(path, net, {"ip": [np.ones(2, np.float32)]})
    assert len(net.layer[0].blobs) == 1  # the caller's message is untouched
    assert _same(read_caffemodel(path).layers[0].blobs[0], np.ones(2, np.float32))


def test_reads_what_protobuf_writes(tmp_path, rng):
    net = pb.NetParameter(name="pb", input=["data"], input_shape=[pb.BlobShape(dim=[1, 3, 5, 5])])
    specs = {
        "legacy": [_pb_blob(rng.standard_normal((2, 3, 3, 3)).astype(np.float32), legacy=True),
                   _pb_blob(np.arange(2, dtype=np.float32), legacy=True)],   # 1x1x1x2, kept 4-D
        "double": [_pb_blob(rng.standard_normal((3, 4)), double=True)],
        "shaped": [_pb_blob(rng.standard_normal((6,)).astype(np.float32)), _pb_blob(np.float32(7))],
        "zero": [pb.BlobProto(num=0, channels=5)],
    }
    for name, blob_list in specs.items():
        net.layer.add(name=name, type="Convolution").blobs.extend(blob_list)
    net.layer[0].blobs[0].diff.extend([9.0] * 54)  # diff is skipped
    net.layer.add(name="last", type="Softmax")
    path = tmp_path / "pb.caffemodel"
    path.write_bytes(net.SerializeToString())

    model = read_caffemodel(path, upgrade=False)
    expected = pb.NetParameter.FromString(path.read_bytes())
    assert len(model.layers) == len(expected.layer)
    for layer, ref in zip(model.layers, expected.layer):
        ref_blobs = [_caffe_blob(b) for b in ref.blobs]
        assert layer.name == ref.name and layer.type == ref.type
        assert _all_same(layer.blobs, [want for want, _ in ref_blobs])
        assert layer.legacy_shape == [legacy for _, legacy in ref_blobs]
        ref.ClearField("blobs")
    assert model.net == expected
    assert model.blobs_by_name()["legacy"].blobs[1].shape == (1, 1, 1, 2)
    assert model.blobs_by_name()["zero"].blobs[0].shape == (0, 5, 0, 0)

    upgraded = read_caffemodel(path)  # the input_shape header becomes an Input layer in front, without blobs
    assert [layer.name for layer in upgraded.layers] == ["input"] + [layer.name for layer in model.layers]
    assert upgraded.layers[0].type == "Input" and not upgraded.layers[0].blobs
    assert all(_all_same(a.blobs, b.blobs) for a, b in zip(upgraded.layers[1:], model.layers))


def test_count_mismatch_names_file_layer_and_blob(tmp_path):
    net = pb.NetParameter()
    layer = net.layer.add(name="conv1", type="Convolution")
    layer.blobs.add().data.append(1)
    layer.blobs.add(shape=pb.BlobShape(dim=[2, 3]), data=[1, 2, 3, 4, 5])
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(net.SerializeToString())
    with pytest.raises(ParseError, match=r"bad\.caffemodel.*blob 1 of layer 'conv1'.*2x3.*6 values.*stores 5"):
        read_caffemodel(path)


def test_legacy_dims_absent_count_as_zero(tmp_path):
    # Caffe: any legacy dim present -> shape (num, channels, height, width) with absent ones 0.
    net = pb.NetParameter()
    net.layer.add(name="a").blobs.add(channels=2, width=3)
    net.layer.add(name="b").blobs.add(channels=2, width=3, data=[1, 2, 3, 4, 5, 6])
    (tmp_path / "a.caffemodel").write_bytes(net.SerializeToString())
    with pytest.raises(ParseError, match="layer 'b'.*0x2x0x3"):
        read_caffemodel(tmp_path / "a.caffemodel")
    del net.layer[1]
    (tmp_path / "a.caffemodel").write_bytes(net.SerializeToString())
    blob = read_caffemodel(tmp_path / "a.caffemodel").layers[0].blobs[0]
    assert blob.shape == (0, 2, 0, 3) and read_caffemodel(tmp_path / "a.caffemodel").layers[0].legacy_shape == [True]


def test_unpacked_and_split_fields_read_like_protobuf(tmp_path, rng):
    values = rng.standard_normal(2500).astype(np.float32)
    doubles = rng.standard_normal(6)
    # BlobProto.data as: 1000 unpacked values, a packed chunk, 1 unpacked value, the rest unpacked; then an
    # unpacked diff run (skipped) and unpacked BlobShape.dim varints split over two shape messages (merged).
    data = (_unpacked_floats(5, values[:1000], "<f4") + _ld(5, values[1000:1500].tobytes())
            + _unpacked_floats(5, values[1500:1501], "<f4") + _unpacked_floats(6, values[:7], "<f4")
            + _unpacked_floats(5, values[1501:], "<f4"))
    blob1 = _ld(7, b"\x08" + _varint(50)) + data + _ld(7, b"\x08" + _varint(50))
    blob2 = _ld(7, _ld(1, _varint(2) + _varint(3))) + _unpacked_floats(8, doubles, "<f8")
    blob3 = _ld(5, np.float32([4, 5]).tobytes()) + _unpacked_floats(5, [6.0], "<f4") + _ld(7, _ld(1, _varint(3)))
    layer = _ld(1, b"u") + _ld(2, b"InnerProduct") + _ld(7, blob1) + _ld(7, blob2) + _ld(4, b"top") + _ld(7, blob3)
    path = tmp_path / "unpacked.caffemodel"
    path.write_bytes(_ld(1, b"hand") + _ld(100, layer))

    expected = pb.NetParameter.FromString(path.read_bytes())
    model = read_caffemodel(path)
    ref = [_caffe_blob(b)[0] for b in expected.layer[0].blobs]
    assert ref[0].shape == (50, 50) and _same(ref[0].ravel(), values)
    assert _all_same(model.layers[0].blobs, ref)
    expected.layer[0].ClearField("blobs")
    assert model.net == expected and model.layers[0].blobs[1].dtype == np.float64


def test_blobs_by_name_follows_caffe_for_duplicates(tmp_path):
    net = pb.NetParameter()
    net.layer.add(name="data", type="Data")
    net.layer.add(name="data", type="Data")
    net.layer.add(name="conv", type="Convolution").blobs.extend([_pb_blob(np.float32([1]))])
    net.layer.add(name="conv", type="Convolution").blobs.extend([_pb_blob(np.float32([2]))])
    net.layer.add(name="conv", type="Convolution")  # a blobless duplicate never hides one with blobs
    (tmp_path / "dup.caffemodel").write_bytes(net.SerializeToString())
    model = read_caffemodel(tmp_path / "dup.caffemodel")
    index = model.blobs_by_name()
    assert len(model.layers) == 5 and sorted(index) == ["conv", "data"]
    assert index["conv"] is model.layers[3] and index["data"] is model.layers[1]


def test_write_duplicate_names_get_the_blobs_each(tmp_path):
    net = _net(("ip", "InnerProduct"), ("ip", "InnerProduct"))
    write_caffemodel(tmp_path / "m.caffemodel", net, {"ip": [np.ones(3, np.float32)]})
    layers = read_caffemodel(tmp_path / "m.caffemodel").layers
    assert all(_same(layer.blobs[0], np.ones(3, np.float32)) for layer in layers)


def test_repr_is_readable(tmp_path):
    write_caffemodel(tmp_path / "m.caffemodel", _net(("ip", "InnerProduct")),
                     {"ip": [np.zeros((5, 4), np.float32), np.float32(1)]})
    model = read_caffemodel(tmp_path / "m.caffemodel")
    assert repr(model.layers[0]) == "LayerBlobs('ip' InnerProduct: [5x4, scalar])"
    assert "1 layers, 1 with blobs, 21 values" in repr(model)
    assert isinstance(model.layers[0], LayerBlobs)


# ----------------------------------------------------------------------------------------------------------------
# Upgrades: V1 and V0 caffemodels


def _v1_blob(shape, rng):
    return _pb_blob(rng.standard_normal(shape).astype(np.float32), legacy=True)


def test_v1_caffemodel_is_upgraded_with_its_blobs(tmp_path, rng):
    net = pb.NetParameter(name="v1", input=["data"], input_dim=[1, 3, 5, 5])
    conv = net.layers.add(name="conv1", type=pb.V1LayerParameter.CONVOLUTION, bottom=["data"], top=["conv1"],
                          blobs_lr=[1, 2], weight_decay=[1, 0])
    conv.convolution_param.num_output = 2
    conv.blobs.extend([_v1_blob((2, 3, 3, 3), rng), _v1_blob((2,), rng)])
    net.layers.add(name="relu1", type=pb.V1LayerParameter.RELU, bottom=["conv1"], top=["conv1"])
    ip = net.layers.add(name="ip", type=pb.V1LayerParameter.INNER_PRODUCT, bottom=["conv1"], top=["ip"])
    ip.blobs.extend([_v1_blob((4, 18), rng), _v1_blob((4,), rng)])
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(net.SerializeToString())

    model = read_caffemodel(path)
    assert not len(model.net.layers) and [(l.name, l.type) for l in model.layers] == [
        ("input", "Input"), ("conv1", "Convolution"), ("relu1", "ReLU"), ("ip", "InnerProduct")]
    assert [p.lr_mult for p in model.net.layer[1].param] == [1, 2]
    by_name = model.blobs_by_name()
    for v1 in net.layers:
        want = [_caffe_blob(b) for b in v1.blobs]
        assert _all_same(by_name[v1.name].blobs, [w for w, _ in want])
        assert by_name[v1.name].legacy_shape == [True] * len(want)
    assert by_name["conv1"].blobs[1].shape == (1, 1, 1, 2)  # Caffe keeps legacy 4-D dims through the upgrade
    assert all(not len(layer.blobs) for layer in model.net.layer)

    raw = read_caffemodel(path, upgrade=False)
    assert [l.type for l in raw.layers] == ["CONVOLUTION", "RELU", "INNER_PRODUCT"] and len(raw.net.layers) == 3
    assert _same(raw.layers[2].blobs[0], by_name["ip"].blobs[0])


def test_v0_caffemodel_padding_layer_is_folded_and_blobs_follow_names(tmp_path, rng):
    net = text_format.Parse("""
        name: "v0" input: "data" input_dim: [1, 1, 6, 6]
        layers { layer { name: "pad1" type: "padding" pad: 1 } bottom: "data" top: "pad1" }
        layers { layer { name: "conv1" type: "conv" num_output: 2 kernelsize: 3 } bottom: "pad1" top: "conv1" }
        layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
        layers { layer { name: "ip1" type: "innerproduct" num_output: 3 } bottom: "conv1" top: "ip1" }
    """, pb.NetParameter())
    net.layers[1].layer.blobs.extend([_v1_blob((2, 1, 3, 3), rng), _v1_blob((2,), rng)])
    net.layers[3].layer.blobs.extend([_v1_blob((3, 72), rng)])
    path = tmp_path / "v0.caffemodel"
    path.write_bytes(net.SerializeToString())

    model = read_caffemodel(path)
    assert [(l.name, l.type) for l in model.layers] == [
        ("input", "Input"), ("conv1", "Convolution"), ("relu1", "ReLU"), ("ip1", "InnerProduct")]
    assert list(model.net.layer[1].convolution_param.pad) == [1]
    by_name = model.blobs_by_name()
    for v0 in (net.layers[1].layer, net.layers[3].layer):
        assert _all_same(by_name[v0.name].blobs, [_caffe_blob(b)[0] for b in v0.blobs])


def test_real_v1_alexnet_caffemodel_pairs_blobs_by_layer(tmp_path, rng):
    source = TESTNETS / "v1__models__bvlc_alexnet__deploy.prototxt"
    if not source.exists():
        pytest.skip(f"{source} is absent: the shared Caffe test files are not beside this checkout.")
    net = text_format.Parse(source.read_text(), pb.NetParameter())
    for i, layer in enumerate(net.layers):
        if layer.HasField("convolution_param") or layer.HasField("inner_product_param"):
            layer.blobs.extend([_v1_blob((i + 1, 2), rng), _v1_blob((i + 1,), rng)])
    path = tmp_path / "alexnet_v1.caffemodel"
    path.write_bytes(net.SerializeToString())
    by_name = read_caffemodel(path).blobs_by_name()
    with_blobs = [layer for layer in net.layers if len(layer.blobs)]
    assert len(with_blobs) == 8  # 5 convolutions, 3 fully connected
    for layer in net.layers:
        assert _all_same(by_name[layer.name].blobs, [_caffe_blob(b)[0] for b in layer.blobs])


# ----------------------------------------------------------------------------------------------------------------
# Damaged files and wrong inputs


def _small_caffemodel(tmp_path, rng) -> Path:
    net = text_format.Parse("""
        name: "small"
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: [1, 2, 3, 3] } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 3 } }
        layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" }
    """, pb.NetParameter())
    path = tmp_path / "small.caffemodel"
    write_caffemodel(path, net, {"conv": [rng.standard_normal((3, 2, 1, 1)), rng.standard_normal(3)],
                                 "ip": [rng.standard_normal((4, 27)), np.float32(1)]})
    return path


def _top_level_ends(data: bytes) -> set:
    """Offsets where a top-level field ends: cutting the file there leaves a valid, shorter message."""
    ends, pos = {0}, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        length, pos = _read_varint(data, pos) if key & 7 == 2 else (0, pos)
        pos += length
        ends.add(pos)
    return ends


def _read_varint(data: bytes, pos: int):
    value = shift = 0
    while True:
        value |= (data[pos] & 0x7F) << shift
        pos += 1
        if data[pos - 1] < 0x80:
            return value, pos
        shift += 7


def test_truncation_anywhere_is_a_parse_error(tmp_path, rng):
    data = _small_caffemodel(tmp_path, rng).read_bytes()
    valid_cuts = _top_level_ends(data)
    cut_path = tmp_path / "cut.caffemodel"
    for size in range(1, len(data)):
        cut_path.write_bytes(data[:size])
        if size in valid_cuts:
            assert len(read_caffemodel(cut_path).layers) < 3
            continue
        with pytest.raises(ParseError, match=r"cut\.caffemodel is not a readable caffemodel: at byte \d+ .*"
                                             r"truncated or corrupt; re-download"):
            read_caffemodel(cut_path)


def test_random_corruption_gives_parse_error_or_a_result(tmp_path, rng):
    data = bytearray(_small_caffemodel(tmp_path, rng).read_bytes())
    path = tmp_path / "flip.caffemodel"
    outcomes = set()
    for _ in range(300):
        damaged = bytearray(data)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            damaged[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(damaged))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_caffemodel(path)
            outcomes.add("read")
        except ParseError:
            outcomes.add("error")
    assert "error" in outcomes


@pytest.mark.parametrize("content, message", [
    (b'name: "lenet"\nlayer {\n', "looks like text"),
    (b"\x89HDF\r\n\x1a\n" + bytes(64), "HDF5 file"),
    (b"\xa2", "at byte 0 a varint runs past the end of the file"),  # the first byte of field 100's tag
    (bytes([0x0F, 0]), "wire type 7"),
    (bytes([0x00, 0]), "has number 0"),
    (_ld(100, _ld(7, b"\x2a\x03abc")), "not a multiple of 4"),
    (_ld(100, _ld(7, _ld(7, _ld(1, _varint(2**64 - 1))))), "negative dimension"),  # dim -1
])
def test_damaged_or_foreign_files_are_parse_errors(tmp_path, content, message):
    path = tmp_path / "x.caffemodel"
    path.write_bytes(content)
    with pytest.raises(ParseError, match=message) as info:
        read_caffemodel(path)
    assert str(path) in str(info.value)


def test_files_of_another_kind_are_refused(tmp_path):
    state = tmp_path / "s.solverstate"
    write_solverstate(state, pb.SolverState(iter=3, learned_net="a.caffemodel"), [np.ones(2, np.float32)])
    with pytest.raises(ParseError, match="field 1 .*NetParameter.name.* wire type 0"):
        read_caffemodel(state)
    model = tmp_path / "m.caffemodel"
    write_caffemodel(model, _net(("ip", "InnerProduct")), {"ip": [np.ones(2, np.float32)]})
    with pytest.raises(ParseError, match=r"solverstate: at byte 0 field 1 \(caffe.SolverState.iter\) has wire type 2"):
        read_solverstate(model)
    write_caffemodel(model, pb.NetParameter(layer=[pb.LayerParameter(name="ip")]), {"ip": [np.ones(2)]})
    with pytest.raises(ParseError, match="field 100 is not a field of caffe.SolverState"):
        read_solverstate(model)


def test_missing_empty_and_directory_paths(tmp_path):
    with pytest.raises(ParseError, match=r"caffemodel .*nope\.caffemodel does not exist"):
        read_caffemodel(tmp_path / "nope.caffemodel")
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    with pytest.raises(ParseError, match=r"empty\.caffemodel is empty \(0 bytes\)"):
        read_caffemodel(tmp_path / "empty.caffemodel")
    with pytest.raises(ParseError, match="is a directory"):
        read_solverstate(tmp_path)
    with pytest.raises(ParseError, match="does not exist"):
        read_blobproto(tmp_path / "mean.binaryproto")


def test_write_errors(tmp_path):
    net = _net(("ip", "InnerProduct"))
    with pytest.raises(WeightsError, match=r"\['conv9'\].*no layer so named.*\['ip'\]"):
        write_caffemodel(tmp_path / "m.caffemodel", net, {"conv9": [np.ones(1)]})
    with pytest.raises(WeightsError, match="list of arrays, got a single array"):
        write_caffemodel(tmp_path / "m.caffemodel", net, {"ip": np.ones(3)})
    with pytest.raises(WeightsError, match="Blob 0 of layer 'ip' has dtype complex128"):
        write_caffemodel(tmp_path / "m.caffemodel", net, {"ip": [np.ones(3, complex)]})
    v1 = pb.NetParameter()
    v1.layers.add(name="old")
    with pytest.raises(NetError, match="V1 'layers'"):
        write_caffemodel(tmp_path / "m.caffemodel", v1, {})
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left behind


# ----------------------------------------------------------------------------------------------------------------
# Over 2 GB: length arithmetic beyond 2**31 without writing 2 GB, and the warning


def test_varints_and_lengths_beyond_2_gib():
    w = binary._Wire(b"", "mem", "caffemodel")
    for value in (0, 127, 128, 2**31 - 1, 2**31, 2**32 + 5, 2**40 + 3, 2**63 + 1):
        encoded = binary._varint(value)
        assert encoded == _varint(value)
        w.buf, w.size = encoded, len(encoded)
        assert w.varint(0, len(encoded)) == (value, len(encoded))
    # A 2 GiB + 12 byte float array without the memory: a zero-stride view of one float.
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(2**29 + 3,), strides=(0,))
    parts = binary._field_parts(7, binary._blob_parts(huge))
    header = parts[0]
    length, after = binary._Wire(header, "mem", "m").varint(1, len(header))
    shape_field = _ld(7, _ld(1, _varint(2**29 + 3)))
    data_header = b"\x2a" + _varint(4 * (2**29 + 3))
    assert after == len(header) and length == len(data_header) + 4 * (2**29 + 3) + len(shape_field)
    assert parts[1] == data_header and parts[2] is huge and parts[3] == shape_field


def test_length_prefix_beyond_the_file_is_reported_without_overflow(tmp_path):
    path = tmp_path / "big.caffemodel"
    path.write_bytes(b"\xa2\x06" + _varint(2**31 + 10) + b"\x0a\x01a")
    with pytest.raises(ParseError, match=r"at byte 0 field 100 of 2147483658 bytes runs past the end of the file"
                                         r" \(needs up to byte 2147483665, the file ends at byte 10\)"):
        read_caffemodel(path)


def test_files_over_the_caffe_limit_warn_and_read_back(tmp_path, monkeypatch, rng):
    monkeypatch.setattr(binary, "CAFFE_SIZE_LIMIT", 1000)
    weight = rng.standard_normal((20, 20), dtype=np.float32)
    path = tmp_path / "big.caffemodel"
    with pytest.warns(UserWarning, match=r"big\.caffemodel is ([\d,]+) bytes, over 2 GB: BVLC Caffe and OpenCV") as rec:
        write_caffemodel(path, _net(("ip", "InnerProduct")), {"ip": [weight]})
    size = int(str(rec[0].message).split(" is ")[1].split(" bytes")[0].replace(",", ""))
    assert size == path.stat().st_size  # the sizes computed before writing are the sizes written
    assert _same(read_caffemodel(path).layers[0].blobs[0], weight)


@pytest.mark.skipif(os.environ.get("SLIM_SLOW_TESTS") != "1", reason="writes 2.1 GB; set SLIM_SLOW_TESTS=1")
def test_real_file_over_2_gib(tmp_path):
    weight = np.ones((2**29 + 2**24,), np.float32)
    weight[-1] = 7
    path = tmp_path / "huge.caffemodel"
    with pytest.warns(UserWarning, match="over 2 GB"):
        write_caffemodel(path, _net(("ip", "InnerProduct"), ("relu", "ReLU")), {"ip": [weight, weight[:3]]})
    assert path.stat().st_size > 2**31
    model = read_caffemodel(path)
    blobs = model.layers[0].blobs
    assert blobs[0].shape == weight.shape and blobs[0][-1] == 7 and _same(blobs[1], weight[:3])
    assert model.layers[1].name == "relu"


# ----------------------------------------------------------------------------------------------------------------
# .solverstate and .binaryproto


def test_solverstate_round_trip_keeps_slim_state(tmp_path, rng):
    state = pb.SolverState(iter=1200, learned_net="snap_iter_1200.caffemodel", current_step=2)
    state.slim_state.torch_rng_state = bytes(range(256)) * 20
    state.slim_state.smoothed_loss.extend([0.5, 0.25])
    state.slim_state.data_epoch, state.slim_state.data_position, state.slim_state.world_size = 3, 4096, 2
    history = [rng.standard_normal((4, 3, 3, 3), dtype=np.float32), rng.standard_normal(4, dtype=np.float32),
               np.float32(0.5)]
    path = tmp_path / "snap.solverstate"
    write_solverstate(path, state, history)

    reference = pb.SolverState()
    reference.CopyFrom(state)
    reference.history.extend(_pb_blob(h) for h in history)
    assert path.read_bytes() == reference.SerializeToString()

    for copy in (False, True):
        got_state, got_history = read_solverstate(path, copy=copy)
        assert got_state == state and not len(got_state.history)
        assert got_state.slim_state.torch_rng_state == bytes(range(256)) * 20
        assert _all_same(got_history, [np.asarray(h) for h in history])
        assert all(h.flags.writeable == copy for h in got_history)


def test_solverstate_written_by_protobuf(tmp_path, rng):
    state = pb.SolverState(iter=7, current_step=1)
    state.history.extend([_pb_blob(rng.standard_normal((2, 3)).astype(np.float32), legacy=True),
                          _pb_blob(rng.standard_normal(3), double=True)])
    path = tmp_path / "pb.solverstate"
    path.write_bytes(state.SerializeToString())
    got_state, history = read_solverstate(path)
    assert got_state.iter == 7 and got_state.current_step == 1 and not len(got_state.history)
    assert _all_same(history, [_caffe_blob(b)[0] for b in state.history])
    assert history[0].shape == (1, 1, 2, 3)


def test_blobproto_legacy_mean_file_and_round_trip(tmp_path, rng):
    mean = rng.uniform(0, 255, (1, 3, 4, 5)).astype(np.float32)
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(_pb_blob(mean, legacy=True).SerializeToString())
    got = read_blobproto(path)
    assert _same(got, mean) and got.flags.writeable and got.flags.aligned

    for array in (mean[0], np.float32(3), rng.standard_normal(7)):
        write_blobproto(path, array)
        assert path.read_bytes() == _pb_blob(np.asarray(array, np.float32)).SerializeToString()
        assert _same(read_blobproto(path), np.asarray(array, np.float32))
    write_blobproto(path, rng.standard_normal(2), keep_double=True)
    assert read_blobproto(path).dtype == np.float64


def test_blobproto_truncation(tmp_path, rng):
    data = _pb_blob(rng.standard_normal((2, 3)).astype(np.float32)).SerializeToString()
    path = tmp_path / "m.binaryproto"
    for size in range(1, len(data)):
        path.write_bytes(data[:size])
        with pytest.raises(ParseError, match="m.binaryproto"):
            read_blobproto(path)


# ----------------------------------------------------------------------------------------------------------------
# torch at the boundary


def test_torch_tensors_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    weight = torch.randn(3, 2, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64)
    half = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    path = tmp_path / "t.caffemodel"
    write_caffemodel(path, _net(("ip", "InnerProduct")), {"ip": [weight, bias, half]})
    blobs = read_caffemodel(path).layers[0].blobs
    assert _same(blobs[0], weight.detach().numpy()) and _same(blobs[1], bias.numpy().astype(np.float32))
    assert _same(blobs[2], np.float32([1.5, -2.0]))
    write_solverstate(tmp_path / "s.solverstate", pb.SolverState(iter=1), [weight])
    assert _same(read_solverstate(tmp_path / "s.solverstate")[1][0], weight.detach().numpy())


def test_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, slim.io.binary as b\n"
            "print('ok', 'torch' in sys.modules and sys.modules['torch'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok False"


# ----------------------------------------------------------------------------------------------------------------
# OpenCV's Caffe importer reads what slim writes


TINY_PROTOTXT = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { use_global_stats: true } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def _caffe_forward(x, conv_w, conv_b, bn, gamma, beta, ip_w, ip_b):
    """Caffe's formulas for TINY_PROTOTXT in float64."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros((n, conv_w.shape[0], h, w))
    for i in range(3):
        for j in range(3):
            y += np.einsum("nchw,oc->nohw", padded[:, :, i:i + h, j:j + w], conv_w[:, :, i, j])
    y += conv_b[None, :, None, None]
    s = bn[2][0]
    factor = 0.0 if s == 0 else 1.0 / s  # Caffe: scale_factor 0 means mean = var = 0
    mean, var = bn[0] * factor, bn[1] * factor
    y = (y - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)  # BatchNorm eps default 1e-5
    y = np.maximum(y * gamma[None, :, None, None] + beta[None, :, None, None], 0)
    # MAX pooling k2 s2, Caffe rounds the output size up: ceil((9 - 2) / 2) + 1 = 5; the last window is clipped.
    y = np.pad(y, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=-np.inf)
    y = y.reshape(n, -1, 5, 2, 5, 2).max(axis=(3, 5))
    logits = y.reshape(n, -1) @ ip_w.T + ip_b
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_opencv_reads_what_slim_writes(tmp_path, rng):
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip(f"OpenCV {cv2.__version__} has no Caffe importer (removed in 5.x); install "
                    f"opencv-python-headless<5.")
    s = 7.5
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    blobs = {
        "conv": [rng.standard_normal((4, 3, 3, 3), dtype=np.float32), rng.standard_normal(4, dtype=np.float32)],
        "bn": [(mean * s).astype(np.float32), (var * s).astype(np.float32), np.float32([s])],
        "scale": [rng.uniform(0.5, 2, 4).astype(np.float32), rng.standard_normal(4, dtype=np.float32)],
        "ip": [rng.standard_normal((5, 100), dtype=np.float32) * 0.3, rng.standard_normal(5, dtype=np.float32)],
    }
    prototxt, caffemodel = tmp_path / "tiny.prototxt", tmp_path / "tiny.caffemodel"
    prototxt.write_text(TINY_PROTOTXT)
    write_caffemodel(caffemodel, text_format.Parse(TINY_PROTOTXT, pb.NetParameter()), blobs)

    cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    x = rng.standard_normal((2, 3, 9, 9), dtype=np.float32)
    cv_net.setInput(x)
    got = cv_net.forward()
    f64 = {name: [b.astype(np.float64) for b in values] for name, values in blobs.items()}
    want = _caffe_forward(x.astype(np.float64), *f64["conv"], f64["bn"], *f64["scale"], *f64["ip"])
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_a_streamed_blob_of_the_wrong_size_writes_nothing(tmp_path):
    from slim.io import StreamedBlob, parse_net

    net = parse_net('layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
                    'inner_product_param { num_output: 2 } }')
    target = tmp_path / "w.caffemodel"
    target.write_bytes(b"old")
    short = StreamedBlob((2, 3), lambda: iter([np.zeros(5, np.float32)]))
    with pytest.raises(WeightsError, match="shape 2x3 produced 20 bytes, not 24"):
        write_caffemodel(target, net, {"ip": [short]})
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["w.caffemodel"]
    ok = StreamedBlob((2, 3), lambda: iter([np.arange(4, dtype=np.float32), np.arange(4, 6, dtype=np.float64)]))
    write_caffemodel(target, net, {"ip": [ok]})
    np.testing.assert_array_equal(read_caffemodel(target).layers[0].blobs[0], np.arange(6).reshape(2, 3))
