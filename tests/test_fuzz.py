"""Seeded fuzzing of every file format slim reads: each mutated input must give a valid result or slim's own error.

Real files of each kind (a prototxt, a .caffemodel, a .solverstate, a CIFAR pickle) are mutated the way damage and
forgery do: bytes flipped, inserted and cut, numbers replaced by extremes, length prefixes enlarged, lines dropped
and repeated. Each mutant goes through the same public entry points a user reaches (parse and build a net, load
weights into it, resume a solver, read a CIFAR batch). The outcome must be a result or a SlimError: never another
exception, never an allocation beyond the process's address-space limit (lowered for the run, so an unbounded
allocation fails loudly here), never more than a few seconds.
"""

import pickle
import pickletools
import random
import resource
import time
import warnings

import numpy as np
import pytest

from slim import proto as pb
from slim.data.cifar import load_cifar
from slim.errors import SlimError
from slim.graph import build_graph
from slim.io import UnknownFieldWarning, parse_net, read_caffemodel
from slim.net import Net
from slim.solver import Solver
from solver_helpers import tiny_net, write_solver

# Extreme numbers a forged file writes where sizes, counts and indices go.
EXTREMES = [0, 1, -1, 7, 255, 2**31 - 1, 2**31, -2**31, 2**32, 2**40, 2**63 - 1, 2**64 - 1]
# Headroom over the address space in use when the fuzzing starts: far above what any of these tiny inputs needs.
HEADROOM = 3 << 30
SECONDS_PER_INPUT = 5.0

PROTOTXT = """name: "fuzz"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 1 group: 1 weight_filler { type: "msra" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { eps: 1e-5 } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "split" type: "Slice" bottom: "pool" top: "a" top: "b" slice_param { axis: 1 slice_point: 2 } }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" concat_param { axis: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "cat" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
# A second net reaching the other shape rules: deconvolution, eltwise, crop, reshape, flatten, LRN, tiling params.
PROTOTXT_2 = """name: "fuzz2"
input: "data" input_shape { dim: 2 dim: 4 dim: 6 dim: 6 }
layer { name: "deconv" type: "Deconvolution" bottom: "data" top: "up"
  convolution_param { num_output: 4 kernel_size: 2 stride: 2 group: 2 dilation: 1 } }
layer { name: "crop" type: "Crop" bottom: "up" bottom: "data" top: "crop" crop_param { axis: 2 offset: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "crop" bottom: "data" top: "sum" eltwise_param { operation: SUM } }
layer { name: "lrn" type: "LRN" bottom: "sum" top: "lrn" lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 } }
layer { name: "prelu" type: "PReLU" bottom: "lrn" top: "lrn" }
layer { name: "pow" type: "Power" bottom: "lrn" top: "pow" power_param { power: 2 scale: 1 shift: 0 } }
layer { name: "ave" type: "Pooling" bottom: "pow" top: "ave"
  pooling_param { pool: AVE kernel_h: 2 kernel_w: 3 pad: 1 } }
layer { name: "shape" type: "Reshape" bottom: "ave" top: "r" reshape_param { shape { dim: 0 dim: -1 dim: 1 } } }
layer { name: "flat" type: "Flatten" bottom: "r" top: "flat" flatten_param { axis: 1 end_axis: -1 } }
layer { name: "drop" type: "Dropout" bottom: "flat" top: "flat" dropout_param { dropout_ratio: 0.5 } }
layer { name: "bias" type: "Bias" bottom: "flat" top: "flat" bias_param { axis: 1 num_axes: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc" inner_product_param { num_output: 3 axis: 1 } }
"""


@pytest.fixture
def bounded_memory():
    """Lower the soft address-space limit for the test (restored after): an unbounded allocation fails here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        in_use = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = in_use + HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One to three damages of the kinds real files suffer and forged files carry."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(6)
        pos = rng.randrange(len(out)) if out else 0
        if kind == 0:      # flipped bytes
            for _ in range(rng.randint(1, 4)):
                out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind == 1:    # a length, count or index replaced by an extreme varint
            out[pos:pos + rng.randint(1, 5)] = varint(rng.choice(EXTREMES) % 2**64)
        elif kind == 2:    # cut short
            del out[rng.randrange(1, max(2, len(out))):]
        elif kind == 3:    # a piece repeated
            end = min(len(out), pos + rng.randint(1, 64))
            out[pos:pos] = out[pos:end]
        elif kind == 4:    # junk inserted
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:              # a piece removed
            del out[pos:pos + rng.randint(1, 32)]
        if not out:
            out = bytearray(b"\x00")
    return bytes(out)


def mutate_message(data: bytes, message_class, rng: random.Random) -> bytes:
    """Damage a binary message where it means something: a field anywhere in it (a blob's dims, iter, a generator
    state) set to an extreme, cleared, repeated or, for bytes, cut or grown. Then a byte-level damage, sometimes."""
    message = message_class.FromString(data)
    for _ in range(rng.randint(1, 3)):
        target, fd = _random_field(message, rng)
        if fd is None:
            continue
        repeated = fd.label == fd.LABEL_REPEATED if hasattr(fd, "label") else fd.is_repeated
        values = getattr(target, fd.name)
        if fd.type == fd.TYPE_MESSAGE:
            if repeated and len(values) and rng.random() < 0.5:
                values.add().CopyFrom(values[rng.randrange(len(values))])
            else:
                target.ClearField(fd.name)
        elif fd.type in (fd.TYPE_BYTES, fd.TYPE_STRING):
            if not repeated:
                value = getattr(target, fd.name)
                setattr(target, fd.name, value[:rng.randrange(len(value) + 1)] if rng.random() < 0.5 else value * 2)
        else:
            extreme = rng.choice(EXTREMES + [1001])
            if fd.type in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
                extreme = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30])
            elif fd.type == fd.TYPE_BOOL:
                extreme = bool(extreme % 2)
            elif fd.type == fd.TYPE_ENUM:
                extreme = rng.choice([v.number for v in fd.enum_type.values])
            try:
                if repeated:
                    values.extend([extreme] * rng.choice([1, 1, 1000]))
                else:
                    setattr(target, fd.name, extreme)
            except (ValueError, TypeError):
                pass  # out of the field's range: protobuf itself refuses to write it
    out = message.SerializeToString()
    return mutate_bytes(out, rng) if rng.random() < 0.3 else out


def _random_field(message, rng: random.Random):
    """A random field that is set somewhere in ``message`` (the message holding it, its descriptor)."""
    target = message
    for _ in range(8):
        fields = target.ListFields()
        if not fields:
            return target, None
        fd, value = rng.choice(fields)
        if fd.type != fd.TYPE_MESSAGE or rng.random() < 0.25:
            return target, fd
        repeated = fd.label == fd.LABEL_REPEATED if hasattr(fd, "label") else fd.is_repeated
        target = value[rng.randrange(len(value))] if repeated else value
    return target, None


def mutate_pickle(data: bytes, rng: random.Random) -> bytes:
    """Damage a pickle where it means something: an opcode's size, count, index or length prefix set to an
    extreme, an opcode swapped for another, or containers nested deep. Then a byte-level damage, sometimes."""
    out = bytearray(data)
    ops = [(op, pos) for op, _, pos in pickletools.genops(data) if op.arg is not None]
    for _ in range(rng.randint(1, 2)):
        kind = rng.randrange(3)
        op, pos = rng.choice(ops)
        if kind == 0 and pos < len(out):
            width = op.arg.n if op.arg.n > 0 else _PREFIX_WIDTH.get(op.arg.n, 0)
            if width:
                value = rng.choice(EXTREMES) % (1 << (8 * width))
                out[pos + 1:pos + 1 + width] = value.to_bytes(width, "little")
        elif kind == 1 and pos < len(out):
            out[pos] = rng.choice(b"()]}aeRbsuNJKMTUVXBC\x8c\x8e\x94\x95\x96rhjpqg0123456789.")
        else:
            depth = rng.choice([100, 20_000])
            out[pos:pos] = b"(" * depth if rng.random() < 0.5 else b"]" * depth + b"a" * (depth - 1)
    return mutate_bytes(bytes(out), rng) if rng.random() < 0.2 else bytes(out)


# pickletools' variable-length arguments, by the width of their length prefix.
_PREFIX_WIDTH = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
                 pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def mutate_text(text: str, rng: random.Random) -> str:
    """Damage a prototxt: numbers replaced by extremes, lines dropped or repeated, braces nested, bytes flipped."""
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice([0, 0, 0, 0, 1, 2, 3, 4, 5])  # mostly numbers: they reach the shape rules
        i = rng.randrange(len(lines))
        if kind == 0:
            words = lines[i].split(" ")
            numeric = [k for k, w in enumerate(words) if w.lstrip("-").replace(".", "", 1).isdigit()]
            if numeric:
                words[rng.choice(numeric)] = str(rng.choice(EXTREMES + [10**9, -5, 1e30, 2.5]))
            lines[i] = " ".join(words)
        elif kind == 1 and len(lines) > 1:
            del lines[i]
        elif kind == 2:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif kind == 3:
            depth = rng.choice([3, 200, 5000])
            lines.insert(i, "layer { " * depth + "}" * rng.choice([0, depth]))
        elif kind == 4:
            chars = list(lines[i]) or [" "]
            chars[rng.randrange(len(chars))] = chr(rng.choice([0, 9, 34, 35, 123, 125, 58, 0xE9, 0xFFFF]))
            lines[i] = "".join(chars)
        else:
            lines[i] = lines[i].replace('"', "", 1)
    return "\n".join(lines) + "\n"


def outcome(action, *args):
    """Run one input; return "ok" or "error" (a SlimError). Anything else fails the test with the input's seed."""
    start = time.monotonic()
    try:
        action(*args)
        result = "ok"
    except SlimError:
        result = "error"
    elapsed = time.monotonic() - start
    assert elapsed < SECONDS_PER_INPUT, f"one input took {elapsed:.1f} s"
    return result


def run_seeds(count, seed, make_input, action):
    results = {"ok": 0, "error": 0}
    for k in range(count):
        rng = random.Random(seed * 100_003 + k)
        case = make_input(rng)
        try:
            results[outcome(action, case)] += 1
        except Exception as e:  # not slim's own error: report which input, reproducibly
            raise AssertionError(f"input {k} (seed {seed}) ended in {type(e).__name__}: {e}") from e
    return results


# ----- the four formats --------------------------------------------------------------------------------------


def build_net(case: tuple) -> None:
    text, tolerant = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownFieldWarning)
        net = parse_net(text, "fuzz.prototxt", allow_unknown_fields=tolerant)
    graph = build_graph(net, "TEST", source="fuzz.prototxt")
    Net(graph, seed=1)


def mutated_net(rng: random.Random) -> tuple:
    return mutate_text(rng.choice([PROTOTXT, PROTOTXT_2]), rng), rng.random() < 0.3


def test_mutated_prototxts_build_or_fail_with_slims_error(bounded_memory):
    with pytest.raises(MemoryError):  # the bound is real: an allocation past it fails
        bytearray(2 * HEADROOM)
    results = run_seeds(200, 1, mutated_net, build_net)
    assert results["ok"] and results["error"]  # the mutations reach both sides: the test can fail either way


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_model")
    net = Net(parse_net(PROTOTXT), seed=2)
    net.save(folder / "m.caffemodel")
    return (folder / "m.caffemodel").read_bytes()


def test_mutated_caffemodels_load_or_fail_with_slims_error(model_bytes, tmp_path, bounded_memory):
    net = Net(parse_net(PROTOTXT), seed=3)
    path = tmp_path / "m.caffemodel"

    def load(data: bytes) -> None:
        path.write_bytes(data)
        read_caffemodel(path, copy=True)
        net.load_weights(str(path))

    def mutant(rng):
        return mutate_message(model_bytes, pb.NetParameter, rng) if rng.random() < 0.7 else mutate_bytes(model_bytes,
                                                                                                         rng)

    results = run_seeds(150, 2, mutant, load)
    assert results["ok"] and results["error"]


def test_mutated_solverstates_resume_or_fail_with_slims_error(tmp_path, bounded_memory):
    solver_path = write_solver(tmp_path, tiny_net(batch=4, channels=3), max_iter=4, snapshot=2, test_iter=1,
                               test_interval=2)
    Solver(solver_path, metrics=False).solve()
    original = (tmp_path / "solver_iter_2.solverstate").read_bytes()
    solver = Solver(solver_path, metrics=False)
    path = tmp_path / "mutant.solverstate"

    def resume(data: bytes) -> None:
        path.write_bytes(data)
        solver.restore(str(path))

    def mutant(rng):
        return mutate_message(original, pb.SolverState, rng) if rng.random() < 0.7 else mutate_bytes(original, rng)

    results = run_seeds(100, 3, mutant, resume)
    assert results["ok"] and results["error"]


def test_mutated_cifar_pickles_load_or_fail_with_slims_error(tmp_path, bounded_memory):
    rng = np.random.default_rng(4)
    batch = {b"batch_label": b"testing batch 1 of 1", b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
             b"labels": [1, 2, 3], b"filenames": [b"a.png", b"b.png", b"c.png"]}
    originals = [pickle.dumps(batch, protocol=p) for p in (2, 4, 5)]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def load(data: bytes) -> None:
        (folder / "test_batch").write_bytes(data)
        load_cifar(str(tmp_path), 10, False, where="fuzz")

    def mutant(rng):
        if rng.random() < 0.15:  # a well-formed pickle of a wrong batch: its fields must be checked
            wrong = dict(batch)
            key = rng.choice(list(wrong))
            wrong[key] = rng.choice([[2**70, -1, 3], np.zeros((3, 3071), np.uint8), np.zeros((3, 3072), np.float32),
                                     {b"x": 1}, None, "text", np.zeros((0, 3072), np.uint8), [[1]] * 3])
            return pickle.dumps(wrong, protocol=rng.choice([2, 4]))
        original = rng.choice(originals)
        return mutate_pickle(original, rng) if rng.random() < 0.7 else mutate_bytes(original, rng)

    results = run_seeds(150, 5, mutant, load)
    assert results["ok"] and results["error"]
