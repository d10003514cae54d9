"""calflop's tied channels: the conv+FC MACs on channels that several layers write at once (residual sums), against
hand computation on a toy residual net, 0% for a plain chain, the zoo's residual nets, and the command's output."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from slim.cli import main
from slim.flops import calflop, compare
from slim.io import parse_net

ROOT = Path(__file__).resolve().parents[1]


def _conv(name, bottom, num_output, kernel=1, pad=0, group=1):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" convolution_param {{ '
            f'num_output: {num_output} kernel_size: {kernel} pad: {pad} group: {group} }} }}\n')


def _sum(name, a, b):
    return f'layer {{ name: "{name}" type: "Eltwise" bottom: "{a}" bottom: "{b}" top: "{name}" }}\n'


def residual_text(b_width=6):
    """A toy residual net on 8x8 images (64 output positions per convolution):

    a (3->4, 3x3) and c (b->4, 3x3) are summed (sum1), e (4->4, 1x1) is added to that (sum2): a, c and e write one
    tied group of 4 channels. b (4->b_width, 1x1) reads it; dw (depthwise 3x3) reads the concatenation of sum2 (tied)
    and b (free); f (1x1 -> 3) reads dw; a global average pooling and fc (3->10) end the net.
    """
    cat = 4 + b_width
    return ('name: "toy"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 '
            'dim: 8 } } }\n'
            + _conv("a", "data", 4, 3, 1)
            + 'layer { name: "relu_a" type: "ReLU" bottom: "a" top: "a" }\n'
            + _conv("b", "a", b_width) + _conv("c", "b", 4, 3, 1) + _sum("sum1", "a", "c")
            + _conv("e", "sum1", 4) + _sum("sum2", "sum1", "e")
            + 'layer { name: "cat" type: "Concat" bottom: "sum2" bottom: "b" top: "cat" }\n'
            + _conv("dw", "cat", cat, 3, 1, group=cat) + _conv("f", "dw", 3)
            + 'layer { name: "pool" type: "Pooling" bottom: "f" top: "pool" pooling_param { pool: AVE global_pooling: '
              'true } }\n'
            + 'layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 10 '
              '} }\n')


# Per image, by hand: MACs = 64 positions x C_out x C_in / group x k x k (fc: 3 x 10).
A, B, C, E = 64 * 4 * 3 * 9, 64 * 6 * 4, 64 * 4 * 6 * 9, 64 * 4 * 4
DW, F, FC = 64 * 10 * 9, 64 * 3 * 10, 3 * 10
# dw's channels are 4 tied + 6 free (the concatenation), and each of its outputs is its own input: 0.4 of it is both.
WRITES = A + C + E + 0.4 * DW
READS = B + E + 0.4 * DW + 0.4 * F
BOTH = E + 0.4 * DW
TOTAL = A + B + C + E + DW + F + FC


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_residual_toy_by_hand():
    ties = calflop(parse_net(residual_text())).ties
    assert ties.groups == 1 and ties.channels == 4 and ties.pinned == 0
    assert ties.producers == (3,)                      # a, c, e; the depthwise dw continues channels, writes none
    assert ties.tied_by == ("sum1", "sum2") and ties.tied_by_types == ("Eltwise",)
    assert ties.macs == TOTAL
    assert ties.writes == pytest.approx(WRITES) and ties.reads == pytest.approx(READS)
    assert ties.both == pytest.approx(BOTH)
    assert ties.touching == pytest.approx(WRITES + READS - BOTH)
    assert ties.free == pytest.approx(0.6 * DW + 0.6 * F + FC)   # dw's and f's free parts, and fc
    assert ties.share("writes") == pytest.approx(WRITES / TOTAL)
    assert ties.share("free") == pytest.approx((0.6 * DW + 0.6 * F + FC) / TOTAL)
    layers = {name: (out, inp) for name, out, inp in ties.layers}
    assert layers == {"a": (1, 0), "b": (0, 1), "c": (1, 0), "e": (1, 1), "dw": (pytest.approx(0.4),) * 2,
                      "f": (0, pytest.approx(0.4)), "fc": (0, 0)}


def test_plain_chain_has_no_tied_channels():
    for path in ("nets/vgg19_cifar10_deploy.prototxt", "nets/densenet40_cifar10_deploy.prototxt"):
        ties = calflop(ROOT / path).ties
        assert ties.groups == ties.channels == 0 and ties.producers == ()
        assert ties.writes == ties.reads == ties.both == 0 and ties.share("writes") == ties.share("touching") == 0
        assert ties.free == ties.macs == calflop(ROOT / path).macs("conv+fc")
    code, out, _ = _run(["calflop", str(ROOT / "nets/vgg19_cifar10_deploy.prototxt")])
    assert code == 0
    assert "Tied channels: none (no channel is written by more than one layer): 0% of the conv+FC MACs" in out


def test_zoo_residual_nets():
    # ResNet-164: per block, conv1 (4w -> w, 1x1) reads the residual stream, conv3 (w -> 4w) writes it, the 3x3
    # between touches neither; each stage's first block adds a projection that reads and writes it.
    ties = calflop(ROOT / "nets/resnet164_cifar10_deploy.prototxt").ties
    assert ties.groups == 3 and ties.channels == 64 + 128 + 256 and ties.producers == (19, 19, 19)
    assert len(ties.tied_by) == 54
    layers = {name: (out, inp) for name, out, inp in ties.layers}
    assert layers["res2_2/conv1"] == (0, 1) and layers["res2_2/conv2"] == (0, 0) and layers["res2_2/conv3"] == (1, 0)
    assert layers["res3_1/shortcut"] == (1, 1) and layers["fc"] == (0, 1) and layers["conv1"] == (0, 0)
    assert ties.share("touching") == pytest.approx(0.4827, abs=1e-4)
    # MobileNet v2: each stage's linear projections are summed; a depthwise convolution is not a second writer.
    ties = calflop(ROOT / "nets/mobilenet_v2_imagenet_deploy.prototxt").ties
    assert ties.groups == 5 and ties.producers == (2, 3, 4, 3, 3) and ties.both == 0


def test_cli_text_and_json_against_a_baseline(tmp_path):
    base, pruned = tmp_path / "base.prototxt", tmp_path / "pruned.prototxt"
    base.write_text(residual_text())
    pruned.write_text(residual_text(b_width=3))     # b's free channels pruned 6 -> 3; the tied ones kept
    code, out, _ = _run(["calflop", str(pruned), "--baseline", str(base)])
    assert code == 0
    assert "Tied channels: 1 group, 4 of the net's" in out
    assert "each written by 3 layers at once (tied by 2 Eltwise layers)" in out
    assert "slim prune keeps or removes a tied channel in all of its layers at once" in out
    assert "Tied channels against the baseline: 4 of 4 kept" in out
    code, out, _ = _run(["calflop", str(pruned), "--baseline", str(base), "--json"])
    data = json.loads(out)
    mine = calflop(pruned).ties
    assert data["tied_channels"]["writes_macs"] == pytest.approx(mine.writes)
    assert data["tied_channels"]["share"]["touching"] == pytest.approx(mine.share("touching"))
    assert data["baseline"]["tied_channels"]["free_macs"] == pytest.approx(0.6 * DW + 0.6 * F + FC)
    change = data["baseline"]["tied_change"]
    # Pruned: cat holds 4 tied + 3 free channels; dw 64 x 7 x 9, f 64 x 3 x 7; their free parts 3/7.
    free = 3 / 7 * 64 * 7 * 9 + 3 / 7 * 64 * 3 * 7 + FC
    assert change["free_macs"] == pytest.approx(free)
    assert change["free_speedup"] == pytest.approx((0.6 * DW + 0.6 * F + FC) / free)
    assert change["channels"] == change["baseline_channels"] == 4
    assert compare(calflop(pruned), calflop(base)).net.ties.touching == pytest.approx(change["touching_macs"])


def test_a_net_without_ties_compares_without_the_tied_lines(tmp_path):
    code, out, _ = _run(["calflop", str(ROOT / "nets/vgg19_cifar10_deploy.prototxt"), "--baseline",
                         str(ROOT / "nets/vgg19_cifar10_deploy.prototxt"), "--json"])
    data = json.loads(out)
    assert data["tied_channels"]["groups"] == 0 and data["baseline"]["tied_change"] is None
