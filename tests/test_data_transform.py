"""The batched device transform against a per-sample transcription of Caffe's DataTransformer::Transform."""

import numpy as np
import pytest
import torch

from slim import proto as pb
from slim.data.transform import build_transform, transform_output_shape
from slim.errors import DataError

WHERE = 'Layer "data" (Data)'


def caffe_transform(image, *, crop, h_off, w_off, mirror, mean=None, mean_values=None, scale=1.0, pad=0):
    """Caffe's per-image loop (data_transformer.cpp), with slim's zero pad of the raw image in front."""
    c, h, w = image.shape
    if pad:
        padded = np.zeros((c, h + 2 * pad, w + 2 * pad), np.float64)
        padded[:, pad:pad + h, pad:pad + w] = image
        image = padded
        if mean is not None:
            mean = np.pad(mean, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
        c, h, w = image.shape
    height, width = (crop, crop) if crop else (h, w)
    out = np.zeros((c, height, width))
    for ch in range(c):
        for y in range(height):
            for x in range(width):
                value = float(image[ch, h_off + y, w_off + x])
                if mean is not None:
                    value -= mean[ch, h_off + y, w_off + x]
                elif mean_values is not None:
                    value -= mean_values[ch if len(mean_values) > 1 else 0]
                out[ch, y, width - 1 - x if mirror else x] = value * scale
    return out


def param(**fields):
    p = pb.TransformationParameter()
    for k, v in fields.items():
        if k == "mean_value":
            p.mean_value.extend(v)
        else:
            setattr(p, k, v)
    return p


def run(spec, images, seed=0):
    aug = spec.draw(len(images), torch.Generator().manual_seed(seed))
    return spec.apply(torch.from_numpy(images), aug).numpy(), aug


@pytest.mark.parametrize("fields", [
    dict(crop_size=5, mirror=True, scale=0.5, mean_value=[10.0, 20.0, 30.0]),
    dict(crop_size=6, mean_value=[7.0]),
    dict(mirror=True, scale=2.0),
    dict(crop_size=8, pad=2, mirror=True, mean_value=[100.0, 50.0, 25.0], scale=0.01),
    dict(crop_size=7),
])
@pytest.mark.parametrize("phase", [pb.TRAIN, pb.TEST])
def test_batched_transform_matches_caffe_per_sample(fields, phase):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 3, 8, 9), dtype=np.uint8)
    spec = build_transform(param(**fields), phase=phase, in_shape=(3, 8, 9), where=WHERE)
    out, aug = run(spec, images)
    assert out.shape == (16,) + spec.out_shape and out.dtype == np.float32
    mv = list(fields.get("mean_value", [])) or None
    for i in range(len(images)):
        ref = caffe_transform(images[i], crop=spec.crop_size, h_off=int(aug.h_off[i]), w_off=int(aug.w_off[i]),
                              mirror=bool(aug.flip[i]), mean_values=mv, scale=spec.scale, pad=spec.pad)
        np.testing.assert_allclose(out[i], ref, rtol=1e-6, atol=1e-4)


def test_offsets_and_mirror_follow_caffe_per_phase():
    spec = build_transform(param(crop_size=5, mirror=True), phase=pb.TRAIN, in_shape=(1, 8, 9), where=WHERE)
    aug = spec.draw(4000, torch.Generator().manual_seed(1))
    # TRAIN: offsets uniform over Rand(H - k + 1) and Rand(W - k + 1); every value occurs.
    assert set(aug.h_off.tolist()) == set(range(4)) and set(aug.w_off.tolist()) == set(range(5))
    assert 0.45 < aug.flip.float().mean().item() < 0.55
    # TEST: the center crop (rounded down), and Caffe still mirrors at random when mirror is set.
    test = build_transform(param(crop_size=5, mirror=True), phase=pb.TEST, in_shape=(1, 8, 9), where=WHERE)
    aug = test.draw(2000, torch.Generator().manual_seed(1))
    assert set(aug.h_off.tolist()) == {1} and set(aug.w_off.tolist()) == {2}
    assert 0.4 < aug.flip.float().mean().item() < 0.6
    no_mirror = build_transform(param(crop_size=5), phase=pb.TEST, in_shape=(1, 8, 9), where=WHERE)
    assert not no_mirror.draw(100, torch.Generator()).flip.any()


def test_pad_makes_padded_pixels_minus_mean_times_scale():
    images = np.full((2, 3, 4, 4), 200, np.uint8)
    spec = build_transform(param(crop_size=4, pad=2, mean_value=[10.0, 20.0, 30.0], scale=0.5), phase=pb.TRAIN,
                           in_shape=(3, 4, 4), where=WHERE)
    aug = spec.draw(2, torch.Generator())
    aug = type(aug)(torch.tensor([0, 4]), torch.tensor([0, 4]), torch.tensor([False, False]))
    out = spec.apply(torch.from_numpy(images), aug).numpy()
    # Sample 0 takes the top-left corner: rows/cols 0-1 are padding, 2-3 image.
    np.testing.assert_allclose(out[0, :, 0, 0], [-5.0, -10.0, -15.0])
    np.testing.assert_allclose(out[0, :, 3, 3], [95.0, 90.0, 85.0])
    np.testing.assert_allclose(out[1, :, 3, 3], [-5.0, -10.0, -15.0])  # bottom-right corner is padding
    # At TEST, the center crop of the padded image is the original image.
    test = build_transform(param(crop_size=4, pad=2), phase=pb.TEST, in_shape=(3, 4, 4), where=WHERE)
    img = np.random.default_rng(0).integers(0, 256, (3, 3, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(run(test, img)[0], img.astype(np.float32))


def write_mean(path, mean):
    blob = pb.BlobProto()
    blob.shape.dim.extend((1,) + mean.shape)
    blob.data.extend(mean.ravel().tolist())
    path.write_bytes(blob.SerializeToString())


@pytest.mark.parametrize("crop, pad, mirror", [(4, 0, True), (4, 1, True), (0, 0, False), (0, 0, True)])
def test_mean_file_is_cropped_with_the_image_offsets(tmp_path, crop, pad, mirror):
    rng = np.random.default_rng(3)
    mean = rng.uniform(0, 255, (3, 6, 7)).astype(np.float32)
    write_mean(tmp_path / "mean.binaryproto", mean)
    images = rng.integers(0, 256, (12, 3, 6, 7), dtype=np.uint8)
    spec = build_transform(param(crop_size=crop, pad=pad, mirror=mirror, scale=0.1,
                                 mean_file=str(tmp_path / "mean.binaryproto")),
                           phase=pb.TRAIN, in_shape=(3, 6, 7), where=WHERE)
    out, aug = run(spec, images, seed=5)
    for i in range(len(images)):
        ref = caffe_transform(images[i], crop=crop, h_off=int(aug.h_off[i]), w_off=int(aug.w_off[i]),
                              mirror=bool(aug.flip[i]), mean=mean, scale=0.1, pad=pad)
        np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-4)


def test_float_input_and_identity():
    x = np.random.default_rng(0).normal(size=(3, 2, 5, 5)).astype(np.float32)
    spec = build_transform(param(), phase=pb.TRAIN, in_shape=(2, 5, 5), where=WHERE)
    assert spec.is_identity
    out = spec.apply(torch.from_numpy(x), spec.draw(3, torch.Generator()))
    np.testing.assert_array_equal(out.numpy(), x)
    out += 1  # the batch never aliases the stored images
    assert not np.array_equal(out.numpy(), x)
    assert spec.out_shape == (2, 5, 5)


@pytest.mark.parametrize("fields, in_shape, message", [
    (dict(crop_size=9), (3, 8, 8), "larger than the 8x8 images"),
    (dict(crop_size=13, pad=2), (3, 8, 8), "padded by 2"),
    (dict(pad=4), (3, 8, 8), "pad is 4 but crop_size is 0"),
    (dict(mean_value=[1.0, 2.0]), (3, 8, 8), "2 mean_value entries"),
    (dict(mean_value=[1.0], mean_file="m.binaryproto"), (3, 8, 8), "both mean_file and mean_value"),
    (dict(mean_file="/nonexistent/mean.binaryproto"), (3, 8, 8), "does not exist"),
])
def test_bad_transform_params_raise(fields, in_shape, message):
    with pytest.raises(DataError, match=message) as e:
        build_transform(param(**fields), phase=pb.TRAIN, in_shape=in_shape, where=WHERE)
    assert 'Layer "data"' in str(e.value)


def test_mean_file_of_the_wrong_shape_or_corrupt_raises(tmp_path):
    write_mean(tmp_path / "m.binaryproto", np.zeros((3, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"shape \(3, 4, 4\) but the images are 3x8x8"):
        build_transform(param(mean_file=str(tmp_path / "m.binaryproto")), phase=pb.TRAIN, in_shape=(3, 8, 8),
                        where=WHERE)
    (tmp_path / "bad.binaryproto").write_bytes(b"\xff\xff\xff")
    with pytest.raises(DataError, match="could not be read as a BlobProto"):
        build_transform(param(mean_file=str(tmp_path / "bad.binaryproto")), phase=pb.TRAIN, in_shape=(3, 8, 8),
                        where=WHERE)


def test_legacy_mean_file_is_read(tmp_path):
    blob = pb.BlobProto(num=1, channels=1, height=2, width=2)
    blob.data.extend([1.0, 2.0, 3.0, 4.0])
    (tmp_path / "m.binaryproto").write_bytes(blob.SerializeToString())
    spec = build_transform(param(mean_file=str(tmp_path / "m.binaryproto")), phase=pb.TEST, in_shape=(1, 2, 2),
                           where=WHERE)
    out, _ = run(spec, np.full((1, 1, 2, 2), 10, np.uint8))
    np.testing.assert_array_equal(out[0, 0], [[9, 8], [7, 6]])


def test_output_shape_needs_no_files():
    assert transform_output_shape(param(crop_size=32, pad=4), (3, 32, 32), where=WHERE) == (3, 32, 32)
    assert transform_output_shape(param(), (1, 8, 8), where=WHERE) == (1, 8, 8)
    assert transform_output_shape(param(crop_size=227), (3, 256, 256), where=WHERE) == (3, 227, 227)
