"""The slim command: dispatch, clear errors with exit status 2, and the small subcommands."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from slim.cli import main

ROOT = Path(__file__).resolve().parents[1]
TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"
DEMO = str(ROOT / "nets" / "demo_digits.prototxt")
DEMO_DEPLOY = str(ROOT / "nets" / "demo_digits_deploy.prototxt")


def test_summary(capsys):
    assert main(["summary", DEMO_DEPLOY]) == 0
    out = capsys.readouterr().out
    assert "conv1_1" in out and "1x32x8x8" in out and "learnable params: 140,458" in out


def test_summary_of_a_train_test_net_whose_data_is_absent(tmp_path, capsys):
    # Caffe's examples/mnist/lenet_train_test.prototxt names LMDBs that are not here: the image size is only in them.
    if not TESTNETS.is_dir():
        pytest.skip(f"{TESTNETS} (real Caffe files) is absent")
    net = str(tmp_path / "lenet_train_test.prototxt")
    shutil.copy(TESTNETS / "examples__mnist__lenet_train_test.prototxt", net)
    assert main(["summary", net]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'examples/mnist/mnist_test_lmdb' (data_param.source) does not exist" in err
    assert "give it with --input-shape data:C,H,W" in err and "--source mnist@TEST=PATH" in err
    assert main(["summary", net, "--input-shape", "data:1,28,28"]) == 0
    out, err = capsys.readouterr()
    assert err == ("slim summary: warning: Layer \"mnist\" (Data): data_param.source 'examples/mnist/mnist_test_lmdb' "
                   "does not exist here; it stands as an Input layer with top data 1x28x28 per sample "
                   "(--input-shape).\n")
    assert "mnist                    Input              - -> data 100x1x28x28, label 100" in out
    assert "ip2 100x10" in out and "learnable params: 431,080" in out
    # A size the prototxt states (crop_size) is used without --input-shape, said once.
    cropped = tmp_path / "cropped.prototxt"
    cropped.write_text(Path(net).read_text().replace("scale: 0.00390625", "scale: 0.00390625 crop_size: 28"))
    assert main(["summary", str(cropped), "--phase", "TRAIN"]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "'examples/mnist/mnist_train_lmdb' does not exist here" in err
    assert "mnist                    Data               - -> data 64x3x28x28, label 64" in out
    # --source points the layer at a database that is here: its first record gives the shape, and nothing is said.
    pytest.importorskip("lmdb")
    from slim.data.lmdb_writer import write_datum_lmdb
    write_datum_lmdb(tmp_path / "test_lmdb", np.zeros((2, 1, 28, 28), np.uint8), np.zeros(2))
    assert main(["summary", net, "--source", f"mnist@TEST={tmp_path / 'test_lmdb'}"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "mnist                    Data               - -> data 100x1x28x28, label 100" in out


def test_summary_of_slimdata_nets_without_their_datasets(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the zoo's CIFAR nets read data/cifar-10-batches-py, not here
    assert main(["summary", str(ROOT / "nets" / "vgg19_cifar10.prototxt")]) == 0
    out, err = capsys.readouterr()
    assert err == ("slim summary: warning: Layer \"data\" (SlimData): slim_data_param.source "
                   "'data/cifar-10-batches-py' does not exist here; the shape of its top data, 3x32x32 per sample, is "
                   "taken from the prototxt, not read from the data.\n")
    assert "data 100x3x32x32" in out


def test_missing_file_is_one_clear_error(capsys):
    assert main(["summary", "no/such/net.prototxt"]) == 2
    err = capsys.readouterr().err
    assert "no/such/net.prototxt" in err and "Traceback" not in err


def test_deploy_matches_the_zoo_twin(tmp_path, capsys):
    from slim.io import read_net
    out = tmp_path / "d.prototxt"
    assert main(["deploy", DEMO, "-o", str(out)]) == 0
    assert read_net(out) == read_net(DEMO_DEPLOY)
    assert main(["deploy", DEMO, "--input-shape", "nonsense"]) == 2
    assert "TOP:C,H,W" in capsys.readouterr().err


def test_deploy_for_opencv_spells_floor_pooling_its_way(tmp_path, capsys):
    from slim.io import read_net
    resnet = ROOT / "nets" / "resnet20_cifar10.prototxt"
    out = tmp_path / "cv.prototxt"
    assert main(["deploy", str(resnet), "--opencv", "-o", str(out)]) == 0
    text = out.read_text()
    assert "ceil_mode: false" in text and "round_mode" not in text
    assert read_net(out) == read_net(ROOT / "nets" / "resnet20_cifar10_deploy.prototxt")
    capsys.readouterr()
    assert main(["deploy", str(resnet)]) == 0 and "round_mode: FLOOR" in capsys.readouterr().out
    # A net written in OpenCV's spelling keeps it without --opencv.
    assert main(["deploy", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ceil_mode: false" in printed and "round_mode" not in printed


def test_zoo_check_and_list(capsys):
    assert main(["zoo", "--check", "--out", str(ROOT / "nets")]) == 0
    assert main(["zoo", "--list"]) == 0
    assert "vgg19_cifar10" in capsys.readouterr().out
    assert main(["zoo", "nope"]) == 2


def test_time_prints_caffe_style_totals(capsys):
    assert main(["time", "--model", DEMO_DEPLOY, "--iterations", "2", "--phase", "TEST"]) == 0
    out = capsys.readouterr().out
    assert "conv1_1" in out and "Average Forward pass" in out and "Average Backward pass" in out


def test_default_outputs_are_ignored_by_git():
    # The first hour of a real user: `slim demo` in the checkout left slim_demo/ among the changes to commit.
    import shutil
    import subprocess
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    from slim.cli import build_parser
    from slim.io import read_solver
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    outputs = [sub[name].get_default("out") for name in ("demo", "pipeline")]
    prefix = read_solver(ROOT / "solvers" / "vgg19_cifar10_sparse.prototxt").snapshot_prefix
    paths = [f"{out}/anything" for out in outputs] + [f"{prefix}_iter_100.caffemodel", f"{prefix}_iter_100.solverstate",
                                                      f"{prefix}.metrics.jsonl"]
    for path in paths:
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert done.returncode == 0, f"{path} is not ignored by .gitignore"


# ----------------------------------------------------------------------------------------------------------------
# one command line: Caffe's spellings, the net argument, devices, unknown flags, help


def _help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_every_subcommand_has_a_description_and_no_markup(capsys):
    from slim.cli import COMMANDS, build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in COMMANDS:
        if command not in sub:
            continue
        text = _help(command, capsys)
        description = text.split("\n\n")[1]
        assert description.strip() and not description.lstrip().startswith(("positional", "options")), command
        assert "``" not in text, command
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    top = capsys.readouterr().out
    assert "Caffe's tools" in top and "``" not in top


def test_python_m_slim_from_the_folder_above_a_clone_named_slim(tmp_path):
    # The clone, seen from the folder above it, is a folder named slim without __init__.py: an editable install
    # must still win over that empty namespace package (setup.py states the package root, so pip writes a .pth
    # path rather than an import hook).
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "slim").symlink_to(root)
    done = subprocess.run([sys.executable, "-c", "import slim, sys; print(slim.__file__); print(slim.Net)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].endswith(str(Path("slim", "__init__.py"))), done.stdout


def test_caffe_single_dash_and_underscore_flags(tmp_path, capsys):
    # `caffe test -model M -weights W -iterations N` and gflags' --flag_name work as they do in Caffe.
    from slim.net import Net
    weights = tmp_path / "w.caffemodel"
    Net(DEMO_DEPLOY, seed=0).save(weights)
    assert main(["time", "-model", DEMO_DEPLOY, "-iterations", "1", "-weights", str(weights)]) == 0
    assert "Average Forward pass" in capsys.readouterr().out
    assert main(["summary", DEMO_DEPLOY, "--allow_unknown_fields"]) == 0
    assert "learnable params: 140,458" in capsys.readouterr().out


def test_unknown_flags_are_reported_by_the_subcommand_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as info:
        main(["calflop", DEMO_DEPLOY, "--baseine", DEMO_DEPLOY])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "slim calflop: error: unrecognized arguments: --baseine (did you mean --baseline?)" in err


def test_the_net_is_positional_or_model_everywhere(capsys):
    for argv in (["summary", "--model", DEMO_DEPLOY], ["summary", "-m", DEMO_DEPLOY], ["calflop", "--model", DEMO_DEPLOY],
                 ["time", DEMO_DEPLOY, "--iterations", "1"], ["prune", DEMO, "--explain"]):
        assert main(argv) == 0, argv
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["summary"])
    assert "the net is required: give its prototxt as NET or --model NET" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["summary", DEMO, "--model", DEMO_DEPLOY])
    assert "the net was given twice" in capsys.readouterr().err


def test_one_device_vocabulary_with_clear_errors(capsys):
    import torch

    from slim.commands._args import resolve_device
    from slim.errors import SlimError
    assert resolve_device(None) == torch.device("cpu") and resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(SlimError, match="--device tpu is not a device; use cpu, cuda"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("gpu") == resolve_device("0") == torch.device("cuda:0")
        return
    for spelling in ("cuda", "gpu", "gpu:1", "0"):
        with pytest.raises(SlimError, match="asks for a GPU, but this torch .* has no CUDA device"):
            resolve_device(spelling)
    # The first hour of a real user: `slim calflop --measure --device cuda` on a CPU build was a raw traceback.
    for argv in (["calflop", DEMO_DEPLOY, "--measure", "--device", "cuda"], ["calflop", DEMO_DEPLOY, "--measure",
                 "--gpu", "0"], ["time", DEMO_DEPLOY, "--device", "gpu"], ["test", DEMO, "--weights", "w", "-gpu", "0"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "has no CUDA device" in err and "Traceback" not in err, err
