"""SVHN from .mat files and the MAT-file level 5 reader, against files written by a small writer below."""

import struct
import zlib

import numpy as np
import pytest

from slim import proto as pb
from slim.data import infer_top_shapes, open_source
from slim.data.svhn import load_svhn, mat_variables, read_mat
from slim.errors import DataError

WHERE = 'Layer "data" (SlimData)'
MI = {"i1": 1, "u1": 2, "i2": 3, "u2": 4, "i4": 5, "u4": 6, "f4": 7, "f8": 9, "i8": 12, "u8": 13}
MX = {"f8": 6, "f4": 7, "i1": 8, "u1": 9, "i2": 10, "u2": 11, "i4": 12, "u4": 13, "i8": 14, "u8": 15}


def element(mi_type, payload, e):
    if len(payload) <= 4:  # MATLAB's small data element: one word holds size (high half) and type (low half)
        return struct.pack(e + "I", len(payload) << 16 | mi_type) + payload.ljust(4, b"\0")
    return struct.pack(e + "II", mi_type, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def matrix(name, array, e="<", stored=None, mx=None, logical=False):
    """A miMATRIX element; ``stored`` is the (possibly smaller) type the values are written in."""
    array = np.asarray(array)
    stored = stored or array.dtype.str[1:]
    flags = (mx or MX[array.dtype.str[1:]]) | (0x0200 if logical else 0)
    body = element(6, struct.pack(e + "II", flags, 0), e)
    body += element(5, np.asarray(array.shape, e + "i4").tobytes(), e)
    body += element(1, name.encode(), e)
    body += element(MI[stored], array.ravel(order="F").astype(e + stored).tobytes(), e)
    return struct.pack(e + "II", 14, len(body)) + body


def char_matrix(name, text, e="<"):
    body = element(6, struct.pack(e + "II", 4, 0), e) + element(5, np.asarray([1, len(text)], e + "i4").tobytes(), e)
    body += element(1, name.encode(), e) + element(4, np.frombuffer(text.encode("utf-16-le"), "<u2").astype(
        e + "u2").tobytes(), e)
    return struct.pack(e + "II", 14, len(body)) + body


def mat_file(path, elements, e="<", compress=False):
    header = b"MATLAB 5.0 MAT-file, written by the slim tests".ljust(116) + b"\0" * 8
    header += struct.pack(e + "H", 0x0100) + (b"IM" if e == "<" else b"MI")
    body = b""
    for el in elements:
        if compress:
            z = zlib.compress(el)
            body += struct.pack(e + "II", 15, len(z)) + z
        else:
            body += el
    path.write_bytes(header + body)


def svhn_arrays(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.float64)
    y[0] = 10
    return x, y


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_read_mat_numeric_variables(tmp_path, compress, endian):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 4, 2))
    b = rng.integers(-5, 5, (5, 1)).astype(np.int16)
    c = np.array([[1, 0, 1]], dtype=np.uint8)
    d = np.array([[1.0, 200.0], [3.0, 4.0]])
    elements = [matrix("alpha", a, endian), char_matrix("note", "hello", endian), matrix("b", b, endian),
                matrix("mask", c, endian, logical=True), matrix("small", d, endian, stored="u1")]
    mat_file(tmp_path / "v.mat", elements, endian, compress)
    assert mat_variables(tmp_path / "v.mat") == ["alpha", "note", "b", "mask", "small"]
    out = read_mat(tmp_path / "v.mat")
    assert set(out) == {"alpha", "b", "mask", "small"}  # the char array is skipped
    np.testing.assert_array_equal(out["alpha"], a)
    np.testing.assert_array_equal(out["b"], b)
    assert out["mask"].dtype == bool and out["mask"].tolist() == [[True, False, True]]
    assert out["small"].dtype == np.float64  # a double stored as uint8 comes back as double
    np.testing.assert_array_equal(out["small"], d)
    assert set(read_mat(tmp_path / "v.mat", ["b"])) == {"b"}


def test_read_mat_rejects_bad_files(tmp_path):
    (tmp_path / "short.mat").write_bytes(b"MATLAB")
    with pytest.raises(DataError, match="shorter than the 128-byte"):
        read_mat(tmp_path / "short.mat")
    mat_file(tmp_path / "cut.mat", [matrix("x", np.zeros((4, 4)))])
    (tmp_path / "cut.mat").write_bytes((tmp_path / "cut.mat").read_bytes()[:-40])
    with pytest.raises(DataError, match="past the end"):
        read_mat(tmp_path / "cut.mat")
    with pytest.raises(DataError, match="does not exist"):
        read_mat(tmp_path / "none.mat")


@pytest.mark.parametrize("compress", [False, True])
def test_svhn_layout_and_label_ten_is_zero(tmp_path, compress):
    x, y = svhn_arrays(7, 0)
    mat_file(tmp_path / "train_32x32.mat", [matrix("X", x), matrix("y", y, stored="u1")], compress=compress)
    samples = load_svhn(str(tmp_path), True, where=WHERE)
    assert samples.images.shape == (7, 3, 32, 32) and samples.images.dtype == np.uint8
    # images[n, c, row, col] == X(row, col, c, n)
    np.testing.assert_array_equal(samples.images, x.transpose(3, 2, 0, 1))
    assert samples.images[4, 2, 5, 17] == x[5, 17, 2, 4]
    np.testing.assert_array_equal(samples.labels, np.where(y[:, 0] == 10, 0, y[:, 0]).astype(int))
    assert samples.labels[0] == 0


def test_svhn_layer_and_errors(tmp_path):
    x, y = svhn_arrays(5, 1)
    mat_file(tmp_path / "test_32x32.mat", [matrix("X", x), matrix("y", y)], compress=True)
    lp = pb.LayerParameter(name="data", type="SlimData")
    lp.slim_data_param.dataset = pb.SlimDataParameter.SVHN
    lp.slim_data_param.source = str(tmp_path)
    lp.slim_data_param.train = False
    lp.slim_data_param.batch_size = 5
    lp.slim_data_param.shuffle = False
    source = open_source(lp, phase=pb.TEST)
    assert source.top_shapes == infer_top_shapes(lp) == [(5, 3, 32, 32), (5,)]
    data, label = source.next_batch()
    np.testing.assert_array_equal(data.numpy(), x.transpose(3, 2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(label.numpy(), y[:, 0] % 10)
    lp.slim_data_param.train = True
    with pytest.raises(DataError, match="train_32x32.mat' does not exist"):
        open_source(lp, phase=pb.TRAIN)
    y[3] = 11
    mat_file(tmp_path / "train_32x32.mat", [matrix("X", x), matrix("y", y)])
    with pytest.raises(DataError, match=r"label 11.0 \(sample 3 .*outside 1..10"):
        open_source(lp, phase=pb.TRAIN)
    mat_file(tmp_path / "train_32x32.mat", [matrix("X", x)])
    with pytest.raises(DataError, match="lacks the numeric variable y"):
        open_source(lp, phase=pb.TRAIN)
