"""slim.caffe.io: the Transformer against hand computation, image loading and resizing, oversampling, and the
BlobProto and Datum converters read back through slim's schema."""

import numpy as np
import pytest

from slim import proto as pb
from slim.caffe import io as caffe_io
from slim.errors import DataError


def test_transformer_preprocess_and_deprocess_by_hand():
    t = caffe_io.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    mean = np.array([104.0, 117.0, 123.0], np.float32)
    t.set_mean("data", mean)
    t.set_input_scale("data", 0.5)
    image = np.random.default_rng(0).uniform(0, 1, (4, 5, 3)).astype(np.float32)
    x = t.preprocess("data", image)
    want = (image.transpose(2, 0, 1)[::-1] * 255 - mean[:, None, None]) * 0.5
    assert x.dtype == np.float32 and x.shape == (3, 4, 5)
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(t.deprocess("data", x[None]), image, rtol=1e-5, atol=1e-6)
    assert image.max() <= 1                                         # the input is not modified


def test_transformer_resizes_to_the_input_and_takes_a_mean_image():
    t = caffe_io.Transformer({"data": (2, 1, 3, 3)})
    t.set_transpose("data", (2, 0, 1))
    t.set_mean("data", np.full((3, 3), 0.25))                      # an H x W mean for a grey input
    image = np.arange(36, dtype=np.float32).reshape(6, 6, 1) / 36
    x = t.preprocess("data", image)
    np.testing.assert_allclose(x, caffe_io.resize_image(image, (3, 3)).transpose(2, 0, 1) - 0.25, atol=1e-6)


@pytest.mark.parametrize("call, needle", [
    (lambda t: t.set_mean("data", np.zeros(4)), "4 channel means for an input of 3 channels"),
    (lambda t: t.set_mean("data", np.zeros((3, 5, 5))), "does not fit the input's items"),
    (lambda t: t.set_channel_swap("data", (1, 0)), "has 3 channels"),
    (lambda t: t.set_transpose("data", (1, 0)), "needs 3 axes"),
    (lambda t: t.preprocess("image", np.zeros((4, 4, 3))), "'image' is not one of its inputs"),
])
def test_transformer_errors(call, needle):
    with pytest.raises(DataError, match=needle):
        call(caffe_io.Transformer({"data": (1, 3, 4, 4)}))


def test_resize_image():
    im = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)[:, :, None]
    np.testing.assert_array_equal(caffe_io.resize_image(im, (4, 4), interp_order=0)[:, :, 0],
                                  np.repeat(np.repeat(im[:, :, 0], 2, 0), 2, 1))
    ramp = caffe_io.resize_image(np.array([[0.0, 1.0]], np.float32)[:, :, None], (1, 4))
    np.testing.assert_allclose(ramp[0, :, 0], [0, 0.25, 0.75, 1])  # pixel centres aligned (half-pixel mapping)
    const = caffe_io.resize_image(np.full((5, 7, 3), 0.3, np.float32), (9, 4), interp_order=3)
    assert const.shape == (9, 4, 3) and np.allclose(const, 0.3, atol=1e-6)
    with pytest.raises(DataError, match="interp_order 2"):
        caffe_io.resize_image(im, (3, 3), interp_order=2)


def test_oversample_takes_corners_centre_and_mirrors():
    im = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    crops = caffe_io.oversample([im, im + 100], (2, 2))
    assert crops.shape == (20, 2, 2, 1)
    firsts = [im[0:2, 0:2], im[0:2, 2:4], im[2:4, 0:2], im[2:4, 2:4], im[1:3, 1:3]]
    for k, want in enumerate(firsts):
        np.testing.assert_array_equal(crops[k], want)
        np.testing.assert_array_equal(crops[5 + k], want[:, ::-1])
        np.testing.assert_array_equal(crops[10 + k], want + 100)


def test_load_image(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "g.png")
    img = caffe_io.load_image(str(tmp_path / "c.png"))
    assert img.dtype == np.float32 and img.shape == (5, 7, 3)
    np.testing.assert_allclose(img, rgb / 255.0, atol=1e-6)
    grey = caffe_io.load_image(str(tmp_path / "g.png"))              # a grey file is tiled to three channels
    np.testing.assert_allclose(grey, np.repeat(rgb[:, :, :1], 3, 2) / 255.0, atol=1e-6)
    one = caffe_io.load_image(str(tmp_path / "c.png"), color=False)  # skimage's rgb2gray weights
    np.testing.assert_allclose(one[:, :, 0], rgb / 255.0 @ [0.2125, 0.7154, 0.0721], atol=1e-5)
    with pytest.raises(DataError, match="does not exist"):
        caffe_io.load_image(str(tmp_path / "missing.png"))


def test_blobproto_round_trips():
    a = np.random.default_rng(2).normal(size=(2, 3, 4)).astype(np.float32)
    d = np.ones_like(a)
    blob = caffe_io.array_to_blobproto(a, d)
    back = pb.BlobProto.FromString(blob.SerializeToString())
    assert list(back.shape.dim) == [2, 3, 4]
    np.testing.assert_array_equal(caffe_io.blobproto_to_array(back), a)
    np.testing.assert_array_equal(caffe_io.blobproto_to_array(back, return_diff=True), d)
    legacy = pb.BlobProto(num=1, channels=2, height=1, width=3, data=[1, 2, 3, 4, 5, 6])
    assert caffe_io.blobproto_to_array(legacy).shape == (1, 2, 1, 3)
    arrays = [a, np.arange(5, dtype=np.float32)]
    for x, y in zip(caffe_io.blobprotovector_str_to_arraylist(caffe_io.arraylist_to_blobprotovector_str(arrays)),
                    arrays):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(DataError, match="diff has shape"):
        caffe_io.array_to_blobproto(a, d[:1])
    with pytest.raises(DataError, match="holds 2 data values"):
        caffe_io.blobproto_to_array(pb.BlobProto(shape=pb.BlobShape(dim=[3]), data=[1, 2]))


def test_blobproto_file_is_slims_mean_file(tmp_path):
    from slim.io import read_blobproto

    mean = np.random.default_rng(3).uniform(0, 255, (1, 3, 4, 4)).astype(np.float32)
    (tmp_path / "mean.binaryproto").write_bytes(caffe_io.array_to_blobproto(mean).SerializeToString())
    np.testing.assert_array_equal(read_blobproto(str(tmp_path / "mean.binaryproto")), mean)


def test_datum_round_trips():
    pixels = np.random.default_rng(4).integers(0, 256, (3, 2, 4)).astype(np.uint8)
    datum = pb.Datum.FromString(caffe_io.array_to_datum(pixels, label=7).SerializeToString())
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 2, 4, 7) and datum.data == pixels.tobytes()
    back = caffe_io.datum_to_array(datum)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, pixels)
    values = np.linspace(-1, 1, 6).reshape(1, 2, 3)
    np.testing.assert_allclose(caffe_io.datum_to_array(caffe_io.array_to_datum(values)), values, rtol=1e-6)
    with pytest.raises(DataError, match="3-D array"):
        caffe_io.array_to_datum(np.zeros((2, 2)))
    with pytest.raises(DataError, match="encoded image"):
        caffe_io.datum_to_array(pb.Datum(encoded=True, data=b"\x89PNG"))
