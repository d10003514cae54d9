"""The slim command: dispatch, clear errors with exit status 2, and the small subcommands."""

from pathlib import Path

import pytest

from slim.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "nets" / "demo_digits.prototxt")
DEMO_DEPLOY = str(ROOT / "nets" / "demo_digits_deploy.prototxt")


def test_summary(capsys):
    assert main(["summary", DEMO_DEPLOY]) == 0
    out = capsys.readouterr().out
    assert "conv1_1" in out and "1x32x8x8" in out and "learnable params: 140,458" in out


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
