"""--layer-width: a published per-layer plan replayed exactly (He et al.'s VGG-16 5x widths), and its bad input."""

from pathlib import Path

import numpy as np
import pytest

from slim.errors import PruneError
from slim.io import parse_net, read_net
from slim.prune import PrunePolicy, prune_net
from tests.test_prune_exact import CASES, random_blobs

NETS = Path(__file__).resolve().parents[1] / "nets"

# The widths of the released channel-pruning VGG-16 (5x): conv1_1 ... conv4_3; conv5 stays whole.
VGG16_5X = dict(zip(["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1",
                     "conv4_2", "conv4_3"], [24, 22, 41, 51, 108, 89, 111, 184, 276, 228]))


def _vgg16_blobs(net):
    """Small random blobs of the right shapes (the criterion only ranks them; no forward is run)."""
    from slim.graph import build_graph
    rng = np.random.default_rng(0)
    return {n.name: [rng.normal(size=s).astype(np.float32) for s in n.blob_shapes]
            for n in build_graph(net, "TEST").layers if n.blob_shapes}


def test_the_released_vgg16_5x_widths_replay_exactly():
    net = read_net(NETS / "vgg16_imagenet_deploy.prototxt")
    result = prune_net(net, _vgg16_blobs(net), PrunePolicy(layer_widths=VGG16_5X, criterion="l1"))
    kept = {c.name: c.after for c in result.report.layers}
    assert {k: kept[k] for k in VGG16_5X} == VGG16_5X
    assert kept["conv5_1"] == kept["conv5_2"] == kept["conv5_3"] == 512
    # By conv MACs the released "5x" model is about 4.5x (the method notes: 4.52x; FC layers make conv+FC lower).
    assert 3.5 < result.report.macs_before / result.report.macs_after < 4.6


def test_widths_of_a_tied_group_must_agree():
    net = parse_net(CASES["residual"])
    blobs = random_blobs(net)
    result = prune_net(net, blobs, PrunePolicy(layer_widths={"conv1": 5, "conv2": 5}, criterion="l1"))
    assert result.report.kept["conv1"] == result.report.kept["conv2"] and len(result.report.kept["conv1"]) == 5
    with pytest.raises(PruneError, match="contradicts"):
        prune_net(net, blobs, PrunePolicy(layer_widths={"conv1": 5, "conv2": 4}, criterion="l1"))


@pytest.mark.parametrize("widths, match", [({"nope": 3}, "not in the net"), ({"conv1": 9}, "give a width from"),
                                           ({"conv1": 0}, "at least 1"), ({"conv1": 2.5}, "whole number")])
def test_bad_widths_are_refused(widths, match):
    net = parse_net(CASES["residual"])
    with pytest.raises(PruneError, match=match):
        prune_net(net, random_blobs(net), PrunePolicy(layer_widths=widths, criterion="l1"))


def test_the_cli_takes_layer_widths(tmp_path, capsys):
    from slim.cli import main
    from slim.io import write_caffemodel
    net = parse_net(CASES["residual"])
    (tmp_path / "n.prototxt").write_text(CASES["residual"])
    write_caffemodel(tmp_path / "w.caffemodel", net, random_blobs(net))
    args = ["prune", "--model", str(tmp_path / "n.prototxt"), "--weights", str(tmp_path / "w.caffemodel"),
            "--criterion", "l1", "--output", str(tmp_path / "o")]
    assert main(args + ["--layer-width", "conv3=2"]) == 0
    pruned = {layer.name: layer for layer in read_net(tmp_path / "o.prototxt").layer}
    assert pruned["conv3"].convolution_param.num_output == 2
    assert main(args + ["--layer-width", "conv3"]) != 0
    assert "--layer-width takes LAYER=CHANNELS (conv1_1=24); got 'conv3'" in capsys.readouterr().err


def test_write_pruned_removes_what_a_killed_prune_left(tmp_path):
    """A .NAME.PID.partial of a dead process is removed; a live process's, another pattern's and links are not."""
    import os
    import subprocess
    import sys
    from slim.prune import write_pruned
    net = parse_net(CASES["residual"])
    result = prune_net(net, random_blobs(net), PrunePolicy(percent=0.3, criterion="l1", min_channels=1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.caffemodel.{dead}.partial"
    live = tmp_path / f".out.caffemodel.{os.getppid()}.partial"
    other = tmp_path / f".other.caffemodel.{dead}.partial"
    for f in (stale, live, other):
        f.write_bytes(b"half")
    link = tmp_path / f".out.json.{dead}.partial"
    link.symlink_to(other)
    write_pruned(result, tmp_path / "out")
    assert not stale.exists() and live.exists() and other.exists() and link.is_symlink()
    assert (tmp_path / "out.caffemodel").is_file()
