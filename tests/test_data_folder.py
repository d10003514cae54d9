"""ImageData list files and IMAGE_FOLDER class folders, decoded with Pillow and checked against OpenCV."""

import numpy as np
import pytest

from slim import proto as pb
from slim.data import infer_top_shapes, open_source
from slim.data.folder import decode_image, resize_bilinear
from slim.errors import DataError

Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write and decode test images")


def write_png(path, rgb: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def images(n, h=6, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def image_data_layer(list_path, root="", batch=2, **fields):
    lp = pb.LayerParameter(name="data", type="ImageData")
    p = lp.image_data_param
    p.source, p.root_folder, p.batch_size = str(list_path), str(root), batch
    for k, v in fields.items():
        setattr(p, k, v)
    return lp


def write_list(tmp_path, entries, text=None):
    lst = tmp_path / "list.txt"
    lst.write_text(text if text is not None else "".join(f"{name} {label}\n" for name, label in entries))
    return lst


def test_image_data_reads_bgr_in_list_order(tmp_path):
    rgb = images(3)
    for i in range(3):
        write_png(tmp_path / "img" / f"my image {i}.png", rgb[i])  # spaces in paths: the label is after the last
    lst = write_list(tmp_path, [], text="my image 0.png 5\n\nmy image 1.png 0\r\nmy image 2.png 7\n")
    lp = image_data_layer(lst, root=tmp_path / "img", batch=3)
    source = open_source(lp, phase=pb.TEST)
    assert source.top_shapes == infer_top_shapes(lp) == [(3, 3, 6, 7), (3,)]
    data, label = source.next_batch()
    np.testing.assert_array_equal(label.numpy(), [5, 0, 7])
    np.testing.assert_array_equal(data.numpy(), rgb[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32))  # BGR


def test_decoding_matches_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="OpenCV is the reference decoder")
    rgb = images(1, 9, 11)[0]
    path = write_png(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(decode_image(path, color="bgr", where="t"), cv2.imread(str(path)).transpose(2, 0, 1))
    # Grey: the same luma weights; libpng (through OpenCV) truncates where Pillow rounds.
    gray = decode_image(path, color="gray", where="t")[0].astype(int)
    assert np.abs(gray - cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)).max() <= 1
    gray = write_png(tmp_path / "g.png", rgb[..., 0])
    assert decode_image(gray, color="native", where="t").shape == (1, 9, 11)
    assert decode_image(gray, color="bgr", where="t").shape == (3, 9, 11)
    for h, w in [(5, 4), (20, 30), (9, 11), (3, 17)]:
        ours = resize_bilinear(decode_image(path, color="bgr", where="t"), h, w)
        ref = cv2.resize(cv2.imread(str(path)), (w, h), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1, (h, w)


def test_image_data_resize_gray_shuffle_and_skip(tmp_path):
    rgb = [images(1, 5 + i, 9, seed=i)[0] for i in range(6)]  # sizes differ: new_height/new_width make one size
    for i, im in enumerate(rgb):
        write_png(tmp_path / f"{i}.png", im)
    lst = write_list(tmp_path, [(f"{i}.png", i) for i in range(6)])
    lp = image_data_layer(lst, root=str(tmp_path) + "/", batch=3, new_height=4, new_width=5, is_color=False,
                          shuffle=True)
    assert infer_top_shapes(lp) == [(3, 1, 4, 5), (3,)]
    source = open_source(lp, phase=pb.TRAIN, seed=2)
    epochs = [np.concatenate([source.next_batch()[1].numpy() for _ in range(2)]) for _ in range(3)]
    assert all(sorted(e) == list(range(6)) for e in epochs)  # every epoch is a permutation of the list
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
    lp.image_data_param.shuffle = False
    lp.image_data_param.rand_skip = 5
    skipped = open_source(lp, phase=pb.TRAIN, seed=2)
    first = int(skipped.next_batch()[1][0])
    assert skipped.state()[1] == (first + 3) % 6 and first < 5
    lp.image_data_param.new_height = lp.image_data_param.new_width = 0
    with pytest.raises(DataError, match=r"line 2 \(1.png\) is 6x9 but .*line 1 \(0.png\) is 5x9.*new_height"):
        open_source(lp, phase=pb.TRAIN)


@pytest.mark.parametrize("text, message", [
    ("", "has no entries"),
    ("a.png 1\nb.png\n", r"line 2 of .* reads 'b.png'"),
    ("a.png one\n", "line 1 of .*non-negative integer label"),
    ("a.png -1\n", "line 1 of"),
    ("missing.png 0\n", r"line 1 \(missing.png\): the image file does not exist"),
    ("junk.png 0\n", r"line 1 \(junk.png\): the image cannot be decoded"),
])
def test_image_data_bad_lists(tmp_path, text, message):
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    write_png(tmp_path / "a.png", images(1)[0])
    lst = write_list(tmp_path, [], text=text)
    with pytest.raises(DataError, match=message) as e:
        open_source(image_data_layer(lst, root=tmp_path), phase=pb.TRAIN)
    assert 'Layer "data" (ImageData)' in str(e.value)


def test_image_data_missing_list_and_half_resize(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(image_data_layer(tmp_path / "none.txt"), phase=pb.TRAIN)
    lst = write_list(tmp_path, [("a.png", 0)])
    with pytest.raises(DataError, match="set both"):
        open_source(image_data_layer(lst, new_height=4), phase=pb.TRAIN)


def folder_layer(source, train=True, batch=4, **fields):
    lp = pb.LayerParameter(name="data", type="SlimData")
    p = lp.slim_data_param
    p.dataset, p.source, p.train, p.batch_size, p.shuffle = pb.SlimDataParameter.IMAGE_FOLDER, str(source), train, \
        batch, False
    for k, v in fields.items():
        setattr(p, k, v)
    return lp


def test_image_folder_classes_splits_and_rgb(tmp_path):
    rgb = images(5, 8, 8)
    layout = {"train/cat/x1.png": 0, "train/cat/sub/x2.png": 1, "train/dog/y.jpg.png": 2, "val/cat/z.png": 3,
              "val/dog/w.png": 4}
    for name, i in layout.items():
        write_png(tmp_path / name, rgb[i])
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    lp = folder_layer(tmp_path, batch=3, new_height=4, new_width=4)
    source = open_source(lp, phase=pb.TRAIN)
    assert source.top_shapes == infer_top_shapes(lp) == [(3, 3, 4, 4), (3,)]
    data, label = source.next_batch()
    np.testing.assert_array_equal(label.numpy(), [0, 0, 1])  # sorted class folders; files sorted, recursively
    for row, i in enumerate([1, 0, 2]):  # paths sort by component: cat/sub/x2.png before cat/x1.png
        expected = resize_bilinear(rgb[i].transpose(2, 0, 1), 4, 4)  # RGB order
        np.testing.assert_array_equal(data[row].numpy(), expected.astype(np.float32))
    test = open_source(folder_layer(tmp_path, train=False, batch=2), phase=pb.TEST)
    data, label = test.next_batch()
    np.testing.assert_array_equal(label.numpy(), [0, 1])
    np.testing.assert_array_equal(data.numpy(), rgb[3:5].transpose(0, 3, 1, 2).astype(np.float32))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(folder_layer(tmp_path / "none"), phase=pb.TRAIN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        open_source(folder_layer(tmp_path / "empty"), phase=pb.TRAIN)
    write_png(tmp_path / "f" / "a" / "1.png", images(1)[0])
    (tmp_path / "f" / "b").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        open_source(folder_layer(tmp_path / "f"), phase=pb.TRAIN)
    write_png(tmp_path / "f" / "b" / "2.png", images(1)[0])
    lp = folder_layer(tmp_path / "f")
    lp.transform_param.crop_size = 10
    with pytest.raises(DataError, match="crop_size 10 is larger than the 6x7 images"):
        open_source(lp, phase=pb.TRAIN)
