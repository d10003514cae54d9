"""Benchmark: a VGG-16-size .caffemodel written and read by slim's codec, beside torch.save / torch.load.

The same 138,357,544 float32 values in VGG-16's 13 convolution and 3 fully connected layer shapes (553 MB) go
through each path in one run, several repetitions each, in a temporary folder; medians are reported.

What each figure includes:
  write  slim   write_caffemodel: serialise the structure, stream the blobs to a temporary file, fsync, rename
                over the target (slim.io.atomic_write).
         torch  torch.save of a state dict of the same tensors into the same atomic_write (temporary file, fsync,
                rename): like with like. Also printed: torch.save in place then fsync (durable, not atomic), and
                torch.save alone (neither).
  read   slim   read_caffemodel(copy=True): structure parsed, every blob read into an owned array, then wrapped
                as a tensor (torch.from_numpy): all data in memory, as after torch.load.
         torch  torch.load(weights_only=True), which also reads all data into memory (no mmap).
                Also printed: slim's default read (views into an mmap of the file) followed by a copy of every
                blob into an owned tensor, torch.from_numpy(np.array(view)); and the views alone (no data touched).
  Reads run with the file in the page cache (it was just written); the benchmark cannot drop the cache.
  Optionally (--protobuf), one pass of protobuf's own ParseFromString (alone, and with the float lists turned into
  numpy arrays) and SerializeToString + write, for reference.

Usage:
    python benchmarks/bench_caffemodel_io.py [--reps 5] [--dir /tmp] [--protobuf]
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slim import proto as pb  # noqa: E402
from slim.io.atomic import atomic_write  # noqa: E402
from slim.io.binary import read_caffemodel, write_caffemodel  # noqa: E402

# VGG-16 (configuration D): (name, out, in) for 3x3 convolutions, then the fully connected layers.
VGG16_CONVS = [("conv1_1", 64, 3), ("conv1_2", 64, 64), ("conv2_1", 128, 64), ("conv2_2", 128, 128),
               ("conv3_1", 256, 128), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv4_1", 512, 256),
               ("conv4_2", 512, 512), ("conv4_3", 512, 512), ("conv5_1", 512, 512), ("conv5_2", 512, 512),
               ("conv5_3", 512, 512)]
VGG16_FCS = [("fc6", 4096, 512 * 7 * 7), ("fc7", 4096, 4096), ("fc8", 1000, 4096)]
VGG16_VALUES = 138_357_544


def vgg16_net():
    """VGG-16's deploy structure as a NetParameter (Input, convs with ReLU, pools, FCs, Softmax)."""
    net = pb.NetParameter(name="VGG_ILSVRC_16_layers")
    data = net.layer.add(name="data", type="Input", top=["data"])
    data.input_param.shape.add(dim=[1, 3, 224, 224])
    bottom = "data"
    for name, out, _ in VGG16_CONVS:
        conv = net.layer.add(name=name, type="Convolution", bottom=[bottom], top=[name])
        conv.convolution_param.num_output = out
        conv.convolution_param.kernel_size.append(3)
        conv.convolution_param.pad.append(1)
        net.layer.add(name=f"relu{name[4:]}", type="ReLU", bottom=[name], top=[name])
        bottom = name
        if name.endswith(("1_2", "2_2", "3_3", "4_3", "5_3")):
            pool = net.layer.add(name=f"pool{name[4]}", type="Pooling", bottom=[name], top=[f"pool{name[4]}"])
            pool.pooling_param.pool = pb.PoolingParameter.MAX
            pool.pooling_param.kernel_size = 2
            pool.pooling_param.stride = 2
            bottom = f"pool{name[4]}"
    for name, out, _ in VGG16_FCS:
        fc = net.layer.add(name=name, type="InnerProduct", bottom=[bottom], top=[name])
        fc.inner_product_param.num_output = out
        bottom = name
        if name != "fc8":
            net.layer.add(name=f"relu{name[2:]}", type="ReLU", bottom=[name], top=[name])
            net.layer.add(name=f"drop{name[2:]}", type="Dropout", bottom=[name], top=[name])
    net.layer.add(name="prob", type="Softmax", bottom=["fc8"], top=["prob"])
    return net


def vgg16_blobs(seed: int = 0) -> dict:
    """Random float32 blobs in VGG-16's shapes: [weight, bias] per layer."""
    rng = np.random.default_rng(seed)
    blobs = {}
    for name, out, inp in VGG16_CONVS:
        blobs[name] = [rng.standard_normal((out, inp, 3, 3), dtype=np.float32),
                       rng.standard_normal(out, dtype=np.float32)]
    for name, out, inp in VGG16_FCS:
        blobs[name] = [rng.standard_normal((out, inp), dtype=np.float32),
                       rng.standard_normal(out, dtype=np.float32)]
    assert sum(b.size for bs in blobs.values() for b in bs) == VGG16_VALUES
    return blobs


def timed(fn, reps: int) -> list:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement (median reported)")
    parser.add_argument("--dir", default=None, help="folder for the temporary files (default: the system temp)")
    parser.add_argument("--protobuf", action="store_true", help="also time protobuf's own parse/serialise once")
    args = parser.parse_args(argv)

    net, blobs = vgg16_net(), vgg16_blobs()
    state = {f"{name}.{kind}": torch.from_numpy(b) for name, bs in blobs.items()
             for kind, b in zip(("weight", "bias"), bs)}
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cm_path, pt_path = Path(tmp) / "vgg16.caffemodel", Path(tmp) / "vgg16.pt"

        def slim_write():
            write_caffemodel(cm_path, net, blobs)

        def torch_write():
            torch.save(state, pt_path)

        def torch_write_atomic():
            with atomic_write(pt_path) as f:
                torch.save(state, f)

        def torch_write_fsync():
            torch.save(state, pt_path)
            fsync_path(pt_path)

        def slim_read():
            model = read_caffemodel(cm_path, copy=True)
            tensors = [torch.from_numpy(b) for layer in model.layers for b in layer.blobs]
            assert sum(t.numel() for t in tensors) == VGG16_VALUES

        def slim_read_mmap_copy():
            model = read_caffemodel(cm_path)
            tensors = [torch.from_numpy(np.array(b)) for layer in model.layers for b in layer.blobs]
            assert sum(t.numel() for t in tensors) == VGG16_VALUES

        def slim_read_views():
            model = read_caffemodel(cm_path)
            assert sum(b.size for layer in model.layers for b in layer.blobs) == VGG16_VALUES

        def torch_read():
            loaded = torch.load(pt_path, weights_only=True)
            assert sum(t.numel() for t in loaded.values()) == VGG16_VALUES

        # Writes first, then reads, each group interleaved so that drift in the shared machine's load hits both
        # sides alike. The no-fsync torch.save is followed by an untimed fsync so that its dirty pages are not
        # flushed during the next measurement.
        def torch_write_then_sync():
            start = time.perf_counter()
            torch_write()
            elapsed = time.perf_counter() - start
            fsync_path(pt_path)
            return elapsed

        writes = [("slim write", slim_write), ("torch.save in atomic_write", torch_write_atomic),
                  ("torch.save + fsync", torch_write_fsync)]
        reads = [("slim read (copy=True)", slim_read), ("torch.load", torch_read),
                 ("slim read (mmap views) + np.array copies", slim_read_mmap_copy),
                 ("slim read (mmap views only)", slim_read_views)]
        for _, fn in writes + reads:  # warm-up: page cache, allocator, imports
            fn()
        for name, _ in writes + [("torch.save (no fsync)", None)] + reads:
            results[name] = []
        for _ in range(args.reps):
            for name, fn in writes:
                results[name] += timed(fn, 1)
            results["torch.save (no fsync)"].append(torch_write_then_sync())
        for _ in range(args.reps):
            for name, fn in reads:
                results[name] += timed(fn, 1)

        # Check the round trip once, bit for bit.
        model = read_caffemodel(cm_path)
        by_name = model.blobs_by_name()
        assert all(np.array_equal(a, b) for name, bs in blobs.items() for a, b in zip(by_name[name].blobs, bs))
        size_cm, size_pt = cm_path.stat().st_size, pt_path.stat().st_size

        if args.protobuf:
            raw = cm_path.read_bytes()
            start = time.perf_counter()
            message = pb.NetParameter.FromString(raw)
            results["protobuf ParseFromString (1 pass)"] = [time.perf_counter() - start]
            arrays = [np.array(blob.data, np.float32) for layer in message.layer for blob in layer.blobs]
            results["protobuf ParseFromString + np.array (1 pass)"] = [time.perf_counter() - start]
            assert sum(a.size for a in arrays) == VGG16_VALUES
            del arrays
            start = time.perf_counter()
            (Path(tmp) / "pb.caffemodel").write_bytes(message.SerializeToString())
            results["protobuf SerializeToString + write (1 pass)"] = [time.perf_counter() - start]
            del message, raw

    med = {name: statistics.median(times) for name, times in results.items()}
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.platform()}")
    print(f"files: caffemodel {size_cm:,} bytes, torch {size_pt:,} bytes; {args.reps} repetitions, median (min-max)")
    for name, times in results.items():
        print(f"  {name:45s} {med[name]:7.3f} s   ({min(times):.3f}-{max(times):.3f})")
    print(f"ratio write slim / torch.save in atomic_write: "
          f"{med['slim write'] / med['torch.save in atomic_write']:.2f}")
    print(f"ratio write slim / (torch.save + fsync): {med['slim write'] / med['torch.save + fsync']:.2f}")
    print(f"ratio write slim / torch.save (no fsync): {med['slim write'] / med['torch.save (no fsync)']:.2f}")
    print(f"ratio read  slim (copy=True) / torch.load: {med['slim read (copy=True)'] / med['torch.load']:.2f}")
    print(f"ratio read  slim (views + copies) / torch.load: "
          f"{med['slim read (mmap views) + np.array copies'] / med['torch.load']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
