"""convert_imageset: a list of images -> LMDB of Datum as Caffe's tool writes it (BGR, keys %08d_path), read back by
slim's Data layer; encoded records, resizing, shuffling, size checks, skipped images and refused input."""

import io
import sys

import numpy as np
import pytest

from slim import proto as pb
from slim.cli import main
from slim.data import open_source
from slim.data import lmdb_writer
from slim.data.imageset import convert_imageset
from slim.errors import DataError
from tests.test_convert_mnist import varint  # the protobuf varint of a Datum field, as Caffe writes it

lmdb = pytest.importorskip("lmdb")
Image = pytest.importorskip("PIL.Image")


def write_images(folder, sizes, seed=0, mode="RGB", ext="png"):
    """Random images saved with Pillow; returns their names and RGB (or grey) arrays as saved."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names, arrays = [], []
    for i, (h, w) in enumerate(sizes):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        name = f"sub/img {i}.{ext}" if i % 2 else f"img{i}.{ext}"  # a sub-folder, and a space in a path
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(array).save(folder / name)
        names.append(name)
        arrays.append(array)
    return names, arrays


def write_list(path, names, labels):
    path.write_text("".join(f"{n} {l}\n" for n, l in zip(names, labels)))
    return path


def read_db(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        records = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    env.close()
    return records


def caffe_raw_datum(chw, label):
    """The bytes of Caffe's CVMatToDatum + set_label: fields 1-5 and encoded (7) set to false."""
    c, h, w = chw.shape
    return (b"\x08" + varint(c) + b"\x10" + varint(h) + b"\x18" + varint(w) + b"\x22" + varint(chw.size)
            + chw.tobytes() + b"\x28" + varint(label) + b"\x38\x00")


def bgr(rgb):
    return np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1))


def test_records_are_caffes_bgr_datums(tmp_path):
    names, arrays = write_images(tmp_path / "root", [(5, 7)] * 4)
    labels = [3, 0, 2, 1]
    lines = []
    result = convert_imageset(tmp_path / "root", write_list(tmp_path / "list.txt", names, labels), tmp_path / "db",
                              echo=lines.append)
    assert result.written == 4 and result.skipped == ()
    assert lines == ["A total of 4 images.", "Processed 4 files."]
    records = read_db(tmp_path / "db")
    assert [k for k, _ in records] == [b"%08d_%s" % (i, n.encode()) for i, n in enumerate(names)]
    assert [v for _, v in records] == [caffe_raw_datum(bgr(a), l) for a, l in zip(arrays, labels)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "list.txt", "root"]  # no temporary folder left


def test_colour_order_is_opencvs(tmp_path):
    cv2 = pytest.importorskip("cv2")
    names, _ = write_images(tmp_path / "root", [(6, 4), (6, 4)], seed=1)
    convert_imageset(tmp_path / "root", write_list(tmp_path / "list.txt", names, [0, 1]), tmp_path / "db")
    for (_, value), name in zip(read_db(tmp_path / "db"), names):
        datum = pb.Datum.FromString(value)
        expected = cv2.imread(str(tmp_path / "root" / name), cv2.IMREAD_COLOR).transpose(2, 0, 1)
        assert (datum.channels, datum.height, datum.width) == (3, 6, 4)
        assert datum.data == expected.tobytes()


def test_data_layer_reads_back_the_images(tmp_path):
    names, arrays = write_images(tmp_path / "root", [(4, 4)] * 5, seed=2)
    convert_imageset(str(tmp_path / "root") + "/", write_list(tmp_path / "list.txt", names, range(5)),
                     tmp_path / "db")
    lp = pb.LayerParameter(name="data", type="Data")
    lp.data_param.source, lp.data_param.batch_size, lp.data_param.backend = str(tmp_path / "db"), 5, 1
    data, label = open_source(lp, phase=pb.TEST).next_batch()
    np.testing.assert_array_equal(data.numpy(), np.stack([bgr(a) for a in arrays]).astype(np.float32))
    np.testing.assert_array_equal(label.numpy(), range(5))


def test_gray_and_resize(tmp_path):
    cv2 = pytest.importorskip("cv2")
    names, _ = write_images(tmp_path / "root", [(9, 7), (5, 11)], seed=3)
    write_list(tmp_path / "list.txt", names, [0, 1])
    convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / "gray", gray=True)
    convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / "small", resize_height=4, resize_width=6)
    for (_, g), (_, s), name in zip(read_db(tmp_path / "gray"), read_db(tmp_path / "small"), names):
        path = str(tmp_path / "root" / name)
        g, s = pb.Datum.FromString(g), pb.Datum.FromString(s)
        grey = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        assert (g.channels, g.height, g.width) == (1,) + grey.shape
        # OpenCV's and Pillow's luma round differently: at most one grey level apart (slim.data.folder).
        assert np.abs(np.frombuffer(g.data, np.uint8).astype(int) - grey.ravel()).max() <= 1
        resized = cv2.resize(cv2.imread(path, cv2.IMREAD_COLOR), (6, 4)).transpose(2, 0, 1)  # cv::Size(w, h)
        assert (s.channels, s.height, s.width) == (3, 4, 6)
        assert np.abs(np.frombuffer(s.data, np.uint8).astype(int) - resized.ravel()).max() <= 1


def test_shuffle_is_seeded_and_keys_follow_the_new_order(tmp_path):
    names, _ = write_images(tmp_path / "root", [(2, 2)] * 12, seed=4)
    write_list(tmp_path / "list.txt", names, range(12))
    orders = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 7)):
        lines = []
        convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / run, shuffle=True, seed=seed,
                         echo=lines.append)
        assert lines[0] == f"Shuffling data (seed {seed})"
        records = read_db(tmp_path / run)
        labels = [pb.Datum.FromString(v).label for _, v in records]
        assert [k for k, _ in records] == [b"%08d_%s" % (i, names[l].encode()) for i, l in enumerate(labels)]
        orders[run] = labels
    assert orders["a"] == orders["b"] != orders["c"]
    assert sorted(orders["a"]) == list(range(12)) and orders["a"] != list(range(12))


def test_encoded_records(tmp_path):
    names, arrays = write_images(tmp_path / "root", [(5, 6)] * 3, seed=5)
    write_list(tmp_path / "list.txt", names, [4, 5, 6])
    convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / "files", encoded=True)
    lines = []
    convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / "jpg", encode_type="jpg", echo=lines.append)
    assert lines[0] == "encode_type specified, assuming encoded=true."
    convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / "grey", encoded=True, gray=True)
    for i, name in enumerate(names):
        kept, jpg, grey = (pb.Datum.FromString(read_db(tmp_path / db)[i][1]) for db in ("files", "jpg", "grey"))
        # Caffe's ReadFileToDatum: the file's own bytes; only data, label and encoded are set.
        assert kept == pb.Datum(data=(tmp_path / "root" / name).read_bytes(), label=4 + i, encoded=True)
        assert kept.SerializeToString() == pb.Datum(data=kept.data, label=4 + i, encoded=True).SerializeToString()
        assert jpg.encoded and jpg.data[:2] == b"\xff\xd8" and not jpg.HasField("channels")
        # The image itself in RGB order, JPEG-encoded at OpenCV's default quality (95): the same decoded pixels.
        reference = io.BytesIO()
        Image.fromarray(arrays[i]).save(reference, format="JPEG", quality=95)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(jpg.data))), np.asarray(Image.open(reference)))
        # --gray with a colour file: re-encoded with one channel, so the Data layer decodes grey images.
        assert Image.open(io.BytesIO(grey.data)).mode == "L"
    # The Data layer decodes the stored files to the pixels of the raw conversion.
    convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / "raw")
    batches = []
    for db in ("files", "raw"):
        lp = pb.LayerParameter(name="data", type="Data")
        lp.data_param.source, lp.data_param.batch_size, lp.data_param.backend = str(tmp_path / db), 3, 1
        batches.append(open_source(lp, phase=pb.TEST).next_batch()[0].numpy())
    np.testing.assert_array_equal(*batches)


def test_check_size_and_commits(tmp_path, monkeypatch):
    names, _ = write_images(tmp_path / "root", [(4, 4), (4, 4), (3, 4), (4, 4), (4, 4)], seed=6)
    write_list(tmp_path / "list.txt", names, range(5))
    with pytest.raises(DataError, match=r"line 3 \(.*img2.png\): the image is 3x3x4 \(CxHxW\) but the first one "
                                        r"\(line 1, .*img0.png\) is 3x4x4; --check_size"):
        convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / "db", check_size=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.txt", "root"]  # nothing written
    monkeypatch.setattr(lmdb_writer, "_COMMIT_EVERY", 2)  # Caffe commits (and logs) every 1,000 records
    lines = []
    assert convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / "db", echo=lines.append).written == 5
    assert lines[1:] == ["Processed 2 files.", "Processed 4 files.", "Processed 5 files."]


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    names, _ = write_images(tmp_path / "root", [(2, 3)] * 3, seed=7)
    (tmp_path / "root" / "broken.png").write_bytes(b"not an image")
    write_list(tmp_path / "list.txt", [names[0], "missing.png", names[1], "broken.png", names[2]], range(5))
    assert main(["convert_imageset", str(tmp_path / "root"), str(tmp_path / "list.txt"), str(tmp_path / "db")]) == 0
    out = capsys.readouterr().out
    assert "list.txt' line 2 (" in out and "missing.png): the image file does not exist" in out
    assert "list.txt' line 4 (" in out and "broken.png): the image cannot be decoded" in out
    assert "Skipped 2 of 5 images that could not be read" in out
    keys = [k for k, _ in read_db(tmp_path / "db")]
    assert keys == [b"%08d_%s" % (i, names[j].encode()) for i, j in ((0, 0), (2, 1), (4, 2))]  # numbers kept


def test_bad_input_is_refused_naming_the_file(tmp_path, capsys):
    names, _ = write_images(tmp_path / "root", [(2, 2)] * 2, seed=8)
    root, good = tmp_path / "root", write_list(tmp_path / "list.txt", names, [0, 1])
    with pytest.raises(DataError, match=r"list file '.*nolist.txt' \(LISTFILE\) does not exist"):
        convert_imageset(root, tmp_path / "nolist.txt", tmp_path / "db")
    (tmp_path / "nolabel.txt").write_text(f"{names[0]} 0\n\n{names[1]}\n")
    with pytest.raises(DataError, match=r"line 3 of '.*nolabel.txt' reads 'sub/img 1.png'; expected 'path label'"):
        convert_imageset(root, tmp_path / "nolabel.txt", tmp_path / "db")
    with pytest.raises(DataError, match="LEVELDB is not supported"):
        convert_imageset(root, good, tmp_path / "db", backend="leveldb")
    with pytest.raises(DataError, match="give both to resize"):
        convert_imageset(root, good, tmp_path / "db", resize_height=4)
    with pytest.raises(DataError, match="ROOTFOLDER '.*nowhere' is not a folder"):
        convert_imageset(tmp_path / "nowhere", good, tmp_path / "db")
    with pytest.raises(DataError, match="Pillow cannot write 'xyz' images"):
        convert_imageset(root, good, tmp_path / "db", encode_type="xyz")
    write_list(tmp_path / "ghosts.txt", ["a.png", "b.png"], [0, 1])
    with pytest.raises(DataError, match="None of the 2 images listed in '.*ghosts.txt' could be read"):
        convert_imageset(root, tmp_path / "ghosts.txt", tmp_path / "db")
    assert not (tmp_path / "db").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".db")]
    (tmp_path / "db").mkdir()
    assert main(["convert_imageset", str(root), str(good), str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err
    assert "'" + str(tmp_path / "db") + "' already exists" in err and "Traceback" not in err
    assert not any((tmp_path / "db").iterdir())  # the existing folder was left alone


def test_missing_pillow_says_how_to_install(tmp_path, monkeypatch):
    names, _ = write_images(tmp_path / "root", [(2, 2)], seed=9)
    write_list(tmp_path / "list.txt", names, [0])
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # import PIL.Image now raises ImportError
    with pytest.raises(DataError, match=r"needs Pillow, which is not installed. Run `pip install slim\[image\]`"):
        convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / "db")
    assert not (tmp_path / "db").exists()


def test_an_interrupted_conversion_leaves_no_database(tmp_path, monkeypatch):
    from slim.data import imageset

    names, _ = write_images(tmp_path / "root", [(2, 2)] * 4, seed=10)
    write_list(tmp_path / "list.txt", names, range(4))
    monkeypatch.setattr(lmdb_writer, "_COMMIT_EVERY", 1)  # two records are committed before the interruption
    decode, calls = imageset.decode_image, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return decode(*args, **kwargs)

    monkeypatch.setattr(imageset, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / "db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.txt", "root"]


def test_caffe_spellings_on_the_command_line(tmp_path, capsys):
    names, _ = write_images(tmp_path / "root", [(3, 5), (4, 4)], seed=11)
    write_list(tmp_path / "list.txt", names, [0, 1])
    assert main(["convert_imageset", "-gray", "-shuffle", "--resize_height=2", "--resize_width=3", "-backend", "lmdb",
                 "--check_size", str(tmp_path / "root") + "/", str(tmp_path / "list.txt"), str(tmp_path / "db")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["Shuffling data (seed 0)", "A total of 2 images."]
    for _, value in read_db(tmp_path / "db"):
        datum = pb.Datum.FromString(value)
        assert (datum.channels, datum.height, datum.width) == (1, 2, 3)


def test_tool_script(tmp_path):
    import subprocess
    from pathlib import Path

    names, _ = write_images(tmp_path / "root", [(2, 2)] * 2, seed=12)
    write_list(tmp_path / "list.txt", names, [0, 1])
    script = Path(__file__).resolve().parents[1] / "tools" / "convert_imageset.py"
    proc = subprocess.run([sys.executable, str(script), "-gray", str(tmp_path / "root") + "/",
                           str(tmp_path / "list.txt"), str(tmp_path / "db")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["A total of 2 images.", "Processed 2 files."]
    assert [pb.Datum.FromString(v).channels for _, v in read_db(tmp_path / "db")] == [1, 1]
