"""slim.io.fast_text: the plain-subset prototxt reader gives protobuf's message field for field, or declines."""

import random
import re
from pathlib import Path

import pytest
from google.protobuf import text_format

from slim import proto as pb
from slim.io import fast_text

ROOT = Path(__file__).resolve().parents[1]
TESTNETS = ROOT.parent / "shared" / "caffe" / "testnets"
FILES = sorted(ROOT.glob("nets/*.prototxt")) + sorted(ROOT.glob("solvers/*.prototxt")) + (
    sorted(TESTNETS.glob("*.prototxt")) if TESTNETS.is_dir() else [])


def _message(path_or_kind):
    return pb.SolverParameter() if "solver" in str(path_or_kind) else pb.NetParameter()


def agree(text, kind="net"):
    """Parse both ways; assert the invariant; return whether the fast reader took the text."""
    fast, slow = _message(kind), _message(kind)
    took = fast_text.parse(text, fast)
    try:
        text_format.Parse(text, slow)
        ok = True
    except Exception:
        ok = False
    if took:
        assert ok, f"fast reader accepted text protobuf refuses: {text!r}"
        assert fast == slow and fast.SerializeToString(deterministic=True) == slow.SerializeToString(
            deterministic=True), text
    else:
        assert fast == _message(kind), "a declined parse must leave the message empty"
    return took


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_prototxt_in_the_repository_reads_fast_and_equal(path):
    assert agree(path.read_text(), path), f"{path} left the fast subset"


ACCEPTED = [
    'name: "n" layer { name: "a" type: "ReLU" bottom: "x" top: "x" }',
    "layer: { name: 'single quotes' }",                              # message with a colon, single quotes
    "layer < name: \"angle\" >",
    'layer { convolution_param { num_output: 0 kernel_size: 3 kernel_size: 1 } }',
    'layer { batch_norm_param { eps: 1e-5 moving_average_fraction: .9 } }',
    'layer { batch_norm_param { eps: 1 } }',                         # an integer spelling of a float
    'layer { batch_norm_param { eps: -0.0 } }',
    'layer { batch_norm_param { eps: 5. } }',
    'layer { batch_norm_param { eps: 1e39 } }',                      # float32 overflow, as protobuf stores it
    'layer { convolution_param { bias_term: t } } layer { convolution_param { bias_term: 0 } }',
    'layer { convolution_param { bias_term: True } }',
    'layer { pooling_param { pool: AVE } }',
    'layer { pooling_param { } }',                                  # empty message: present
    'layer { name: "é ü" }',                                         # UTF-8 in strings
    "# comment\nlayer {  # trailing\n name: \"a#b\"\n}\n# end",
    'input_dim: -0',
]

DECLINED = [
    'layer { name: "a\\"b" }',                      # escapes: protobuf decodes them
    'layer { name: "a" "b" }',                       # adjacent strings concatenate
    'layer { convolution_param { num_output: 0x10 } }',
    'layer { convolution_param { num_output: 010 } }',
    'layer { batch_norm_param { eps: inf } }',
    'layer { batch_norm_param { eps: 1.0f } }',
    'layer { batch_norm_param { eps: 01.5 } }',
    'layer { pooling_param { pool: 1 } }',          # an enum by number
    'layer { bottom: ["a", "b"] }',
    'layer { name: "a"; }',
    'layer { name: "a", }',
    'layer { convolution_param { num_output: -1 } }',
    'layer { convolution_param { num_output: 4294967296 } }',
    'layer { name: "a" name: "b" }',                 # a singular field twice
    'layer { pooling_param { pool: MAX } pooling_param { pool: AVE } }',
    'layer { name "a" }',                            # scalar without a colon
    'layer { nope: 1 }',
    'layer { name: "a" ',
    'layer { name: "a" } }',
    'layer { convolution_param { num_output: 1.5 } }',
    'layer { convolution_param { bias_term: yes } }',
    'layer { name: a }',
    'layer { pooling_param { pool: "MAX" } }',
    'layer { name: "a\nb" }',
    '[ext] { }',
    'layer { name: +"a" }',
    'layer { convolution_param { num_output: +1 } }',
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_plain_text_is_read_like_protobuf(text):
    assert agree(text)


@pytest.mark.parametrize("text", DECLINED)
def test_text_outside_the_subset_is_left_to_protobuf(text):
    assert not agree(text)


def test_mutated_nets_never_read_differently():
    # Random edits of a real net (tokens dropped, doubled, swapped or replaced by odd spellings): whatever the
    # fast reader accepts, protobuf accepts, to the same message.
    rng = random.Random(14)
    spellings = ["0", "-1", "1e3", "0x1", "07", "inf", "nan", "true", "f", "MAX", '"s"', "'s'", "{", "}", ":", ";",
                 ",", "[", "]", "<", ">", "#", "\\", '"', "1.5", ".5", "-.5", "+1", "name", "bottom", "pool", "1f"]
    for path in ROOT.glob("nets/*_deploy.prototxt"):
        tokens = re.findall(r'"[^"]*"|\S+', path.read_text().split("layer {", 4)[-1])
        for _ in range(60):
            mutated = list(tokens[:300])
            for _ in range(rng.randint(1, 3)):
                k = rng.randrange(len(mutated))
                edit = rng.randrange(4)
                if edit == 0:
                    del mutated[k]
                elif edit == 1:
                    mutated.insert(k, mutated[k])
                elif edit == 2:
                    j = rng.randrange(len(mutated))
                    mutated[k], mutated[j] = mutated[j], mutated[k]
                else:
                    mutated[k] = rng.choice(spellings)
            agree("layer { " + " ".join(mutated))


def test_odd_values_in_real_nets_never_read_differently():
    rng = random.Random(7)
    spellings = ["0", "-1", "1e3", "0x1", "07", "inf", "nan", "true", "f", "MAX", '"s"', "'s'", "1.5", ".5", "-.5",
                 "+1", "1f", "-0", "00", "True", "t", "2147483648", "-2147483649", "4294967296", "1e-50", "1e39",
                 '"a\\nb"', "AVE", "TRAIN", "SUM", "-inf", "1.", "5", "'x'\"y\"", '""', "1e400",
                 "9223372036854775808"]
    for path in [ROOT / "nets" / "resnet20_cifar10.prototxt", ROOT / "solvers" / "vgg19_cifar10_sparse.prototxt"]:
        text = re.sub(r"#[^\n]*", "", path.read_text())
        tokens = re.findall(r'"[^"]*"|[^\s:{}]+|[:{}]', text)
        values = [i for i in range(1, len(tokens)) if tokens[i - 1] == ":"]
        for _ in range(150):
            mutated = list(tokens)
            for _ in range(rng.randint(1, 2)):
                mutated[rng.choice(values)] = rng.choice(spellings)
            agree(" ".join(mutated), path)
