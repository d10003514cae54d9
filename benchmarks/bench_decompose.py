"""3C on VGG-16's convolutions at the paper's ranks: per-layer reconstruction error and MACs, and the CPU speed-up
measured against the MAC ratio.

    python benchmarks/bench_decompose.py                       # defaults: 3c, the paper's 4x ranks, 64x64 calibration
    python benchmarks/bench_decompose.py --method spatial --prune-ratio 1 --images 64

The net is nets/vgg16_imagenet_deploy.prototxt cut after pool5 (the convolutions: 15.35 GMACs per 224x224 image).
Its weights are random with a decaying spectrum: every convolution's reshaped kernel (c k_h) x (n k_w) (the matrix
the spatial split factors) is ``U diag(s) V^T`` with random orthonormal U, V and ``s_i ~ exp(-i / tau)``,
``tau = rank_max / --decay``, scaled to the MSRA variance (2 / fan-in), and small random biases. Calibration images
are gaussian noise from a DummyData --calib-net at ``--size`` (default 64x64, so the fits' passes stay short on two
cores; the decomposition does not depend on the size). The ranks are the released code's rankdic for 4x
(conv1_2 17, conv2_1 37, ... conv5_3 379; conv1_1 whole, as the paper); ``--ranks paper43`` scales the non-conv5
ranks by 4/3 as its keep=3 setting does.

Speed: each original convolution against its replacement chain, and the whole conv net against the decomposed one,
at ``--time-size`` (default 224x224, batch 1) on ``--threads`` CPU threads (default 1: the machine is shared, and one
thread is the steadier measure), ``--repeats`` interleaved runs each, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def _threads(argv) -> str:
    """--threads, read before numpy and torch load their BLAS (which sizes its thread pool on import)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "1"


for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _threads(sys.argv[1:])

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slim import proto as pb  # noqa: E402
from slim.decompose import DecomposePolicy, decompose_net, write_decomposed  # noqa: E402
from slim.graph import build_graph  # noqa: E402
from slim.io import parse_net, read_net  # noqa: E402
from slim.prune import Calibration  # noqa: E402

#: The released code's rankdic (4x); conv1_1 is not decomposed.
PAPER_RANKS = {"conv1_2": 17, "conv2_1": 37, "conv2_2": 47, "conv3_1": 83, "conv3_2": 89, "conv3_3": 106,
               "conv4_1": 175, "conv4_2": 192, "conv4_3": 227, "conv5_1": 398, "conv5_2": 390, "conv5_3": 379}


def conv_net(size: int) -> "pb.NetParameter":
    """VGG-16's layers up to pool5, input 3 x size x size, batch 1."""
    net = read_net(ROOT / "nets" / "vgg16_imagenet_deploy.prototxt")
    out = pb.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    for lp in net.layer:
        layer = out.layer.add()
        layer.CopyFrom(lp)
        if lp.type == "Input":
            del layer.input_param.shape[0].dim[:]
            layer.input_param.shape[0].dim.extend([1, 3, size, size])
        if lp.name == "pool5":
            break
    return out


def at_size(net: "pb.NetParameter", size: int) -> "pb.NetParameter":
    out = pb.NetParameter()
    out.CopyFrom(net)
    for lp in out.layer:
        if lp.type == "Input":
            del lp.input_param.shape[0].dim[:]
            lp.input_param.shape[0].dim.extend([1, 3, size, size])
    return out


def spectral_weights(graph, decay: float, seed: int):
    """Random convolution weights whose spatial-split spectrum decays exponentially (see the module docstring)."""
    rng = np.random.default_rng(seed)
    blobs = {}
    for node in graph.layers:
        if node.type != "Convolution":
            continue
        n, c, kh, kw = node.blob_shapes[0]
        rows, cols = c * kh, n * kw
        r = min(rows, cols)
        U = np.linalg.qr(rng.normal(size=(rows, r)))[0]
        V = np.linalg.qr(rng.normal(size=(cols, r)))[0]
        s = np.exp(-np.arange(r) / (r / decay))
        s *= np.sqrt(2.0 * n / float((s ** 2).sum()))              # ||W||^2 = n * fan-in * 2 / fan-in
        M = (U * s) @ V.T
        W = M.reshape(c, kh, n, kw).transpose(2, 0, 1, 3)
        blobs[node.name] = [W.astype(np.float32), rng.normal(0, 0.05, n).astype(np.float32)]
    return blobs


def calib_net(size: int, batch: int):
    return parse_net(f'layer {{ name: "data" type: "DummyData" top: "data" dummy_data_param {{ shape {{ dim: {batch} '
                     f'dim: 3 dim: {size} dim: {size} }} data_filler {{ type: "gaussian" std: 1 }} }} }}\n')


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_layers(original, decomposed, report, repeats: int):
    """Per decomposed layer: median ms of the original convolution and of its chain (interleaved), at the nets'
    input size, on random inputs of the layer's input shape."""
    out = {}
    rows = {}
    for r in report.layers:
        node = original.graph.layer(r.layer)
        x = torch.randn(node.bottom_shapes[0])
        orig = (lambda node=node, x=x: node.layer.forward(original.params[node.name], [x]))
        chain_nodes = [decomposed.graph.layer(n) for n in r.layers]
        xd = torch.randn(chain_nodes[0].bottom_shapes[0])          # fewer channels where the input was pruned

        def chain(nodes=chain_nodes, x=xd):
            y = x
            for nd in nodes:
                y = nd.layer.forward(decomposed.params[nd.name], [y])[0]
            return y

        rows[r.layer] = (orig, chain)
        out[r.layer] = ([], [])
    with torch.no_grad():
        for fns in rows.values():                      # warm-up
            fns[0](), fns[1]()
        for _ in range(repeats):
            for name, (orig, chain) in rows.items():
                out[name][0].append(_timed(orig))
                out[name][1].append(_timed(chain))
    return {name: (statistics.median(a) * 1e3, statistics.median(b) * 1e3) for name, (a, b) in out.items()}


def time_nets(original, decomposed, size: int, repeats: int):
    x = torch.randn(1, 3, size, size)
    a, b = [], []
    with torch.no_grad():
        original(x), decomposed(x)
        for _ in range(repeats):
            a.append(_timed(lambda: original(x)))
            b.append(_timed(lambda: decomposed(x)))
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="3c", choices=["spatial", "channel", "3c"])
    p.add_argument("--ranks", default="paper", choices=["paper", "paper43"],
                   help="the released rankdic (4x), or with the non-conv5 ranks x 4/3 (its keep=3)")
    p.add_argument("--prune-ratio", type=float, default=None, help="3C's pruning ratio (default 1.15 for 3c)")
    p.add_argument("--size", type=int, default=64, help="calibration image size (default 64)")
    p.add_argument("--images", type=int, default=64,
                   help="calibration images (default 64; conv5's fits need ~140 at 16 samples per image)")
    p.add_argument("--samples", type=int, default=16, help="sampled output positions per image and layer")
    p.add_argument("--decay", type=float, default=6.0, help="spectrum decay: s_i = exp(-decay i / rank_max)")
    p.add_argument("--time-size", type=int, default=224, help="input size of the speed measurement (default 224)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the fits and the timing (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed runs (default 5)")
    p.add_argument("--out", default=str(ROOT / "out" / "bench_decompose"), help="folder for the files and JSON")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    net = conv_net(args.size)
    graph = build_graph(net, "TEST")
    blobs = spectral_weights(graph, args.decay, args.seed)
    ranks = dict(PAPER_RANKS)
    if args.ranks == "paper43":
        ranks = {k: (int(v * 4 / 3) if not k.startswith("conv5") else v) for k, v in ranks.items()}
    policy = DecomposePolicy(method=args.method, ranks=ranks, prune_ratio=args.prune_ratio)
    cal = Calibration(images=args.images, samples_per_image=args.samples, net=calib_net(args.size, 16),
                      seed=args.seed)
    t0 = time.perf_counter()
    result = decompose_net(net, blobs, policy, calibration=cal, source="vgg16 conv layers")
    wall = time.perf_counter() - t0
    paths = write_decomposed(result, Path(args.out) / f"vgg16_{args.method}")
    report = result.report
    print(report)

    from slim.net import Net
    big_o, big_d = at_size(net, args.time_size), at_size(result.net, args.time_size)
    original = Net(big_o, seed=0)
    decomposed = Net(big_d, seed=0)
    for target, source in ((original, blobs), (decomposed, result.blobs)):
        with torch.no_grad():
            for name, tensors in target.params.items():
                for t, a in zip(tensors, source[name]):
                    t.copy_(torch.from_numpy(np.asarray(a, np.float32)).reshape(t.shape))
    big_graph_o, big_graph_d = build_graph(big_o, "TEST"), build_graph(big_d, "TEST")
    layer_ms = time_layers(original, decomposed, report, args.repeats)
    net_ms = time_nets(original, decomposed, args.time_size, args.repeats)
    from slim.prune.core import conv_fc_macs
    macs_o, macs_d = conv_fc_macs(big_graph_o), conv_fc_macs(big_graph_d)

    rows = []
    for r in report.layers:
        node = graph.layer(r.layer)
        before = big_graph_o.layer(r.layer).layer.macs()
        after = sum(big_graph_d.layer(n).layer.macs() for n in r.layers)
        ms_o, ms_d = layer_ms[r.layer]
        rows.append({"layer": r.layer, "shape": list(node.blob_shapes[0]), "d": r.rank, "d_": r.channel_rank,
                     "outputs": r.outputs, "kept_outputs": r.kept_outputs, "folded": r.folded,
                     "energy_kept": r.spectrum_kept, "macs_before": before, "macs_after": after,
                     "error_svd": r.error_svd_relu, "error_fit": r.error_fit_relu, "error_final": r.error_final_relu,
                     "error_svd_linear": r.error_svd, "error_fit_linear": r.error_fit,
                     "ms_before": ms_o, "ms_after": ms_d})
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    summary = {"method": args.method, "ranks": ranks, "prune_ratio": policy.ratio, "size": args.size,
               "images": args.images, "samples_per_image": args.samples, "decay": args.decay,
               "time_size": args.time_size, "threads": args.threads, "repeats": args.repeats,
               "decompose_seconds": round(wall, 1), "report_seconds": report.seconds,
               "macs_before": macs_o, "macs_after": macs_d, "net_ms": net_ms, "layers": rows,
               "outputs": report.outputs, "machine": platform.platform(), "processor": platform.processor(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "loadavg": load,
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with open(Path(args.out) / f"bench_decompose_{args.method}.json", "w") as f:
        json.dump(summary, f, indent=1)

    print()
    print(f"| layer | d | d' | outputs | spectrum kept | error data-free | error fitted | error written | "
          f"MACs ({args.time_size}px) | MAC ratio | ms before | ms after | measured |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        outs = f"{row['outputs']}" + (f"->{row['kept_outputs']}" if row["kept_outputs"] else "")
        fold = " (folded)" if row["folded"] else ""
        e = lambda v: "-" if v is None else f"{v:.3f}"
        kept = "-" if row["energy_kept"] is None else f"{row['energy_kept']:.1%}"
        print(f"| {row['layer']}{fold} | {row['d']} | {row['d_'] or '-'} | {outs} | {kept} | "
              f"{e(row['error_svd'])} | {e(row['error_fit'])} | {e(row['error_final'])} | "
              f"{row['macs_before'] / 1e6:.0f}M -> {row['macs_after'] / 1e6:.0f}M | "
              f"{row['macs_before'] / row['macs_after']:.2f}x | {row['ms_before']:.1f} | {row['ms_after']:.1f} | "
              f"{row['ms_before'] / row['ms_after']:.2f}x |")
    sum_o = sum(r["ms_before"] for r in rows)
    sum_d = sum(r["ms_after"] for r in rows)
    print(f"\ndecomposed layers: {sum(r['macs_before'] for r in rows) / 1e9:.2f} -> "
          f"{sum(r['macs_after'] for r in rows) / 1e9:.2f} GMACs "
          f"({sum(r['macs_before'] for r in rows) / sum(r['macs_after'] for r in rows):.2f}x), "
          f"{sum_o:.0f} -> {sum_d:.0f} ms ({sum_o / sum_d:.2f}x measured)")
    print(f"whole conv net at {args.time_size}px: {macs_o / 1e9:.2f} -> {macs_d / 1e9:.2f} GMACs "
          f"({macs_o / macs_d:.2f}x), {net_ms[0]:.0f} -> {net_ms[1]:.0f} ms ({net_ms[0] / net_ms[1]:.2f}x measured)")
    for name, o in report.outputs.items():
        print(f"output {name}: relative error {o['error']:.3f} on held-out images")
    print(f"decompose_net: {wall:.0f} s ({report.seconds}); {args.threads} thread(s); load average {load}")
    print(f"files: {paths['prototxt']}, {paths['caffemodel']}, {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
