"""``slim calflop NET``: MACs (three conventions), FLOPs, parameters and activation memory per layer and in total;
against ``--baseline`` the reductions and the theoretical speed-up; with ``--measure`` the forward latency of both
and the measured speed-up. The conventions are stated in slim.flops and in the output. The nets' data need not be on
this machine (slim.offline): ``--input-shape`` and ``--source`` apply to the net and, where they fit, the baseline."""

import json

from slim.commands._args import DEVICE_HELP, add_input_shape, add_model, add_source, resolve_device, warn
from slim.errors import SlimError
from slim.flops import calflop, compare, format_text, measure_latencies, measure_latency, to_csv, to_json
from slim.offline import build_offline


def register(sub):
    p = sub.add_parser("calflop", help="count MACs/FLOPs, parameters and activation memory; compare with a baseline "
                                       "and measure the speed-up")
    add_model(p, "net prototxt")
    p.add_argument("--baseline", metavar="NET", help="the baseline net prototxt (e.g. the unpruned net)")
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"], help="NetState phase (default TEST)")
    p.add_argument("--measure", action="store_true",
                   help="time the forward pass of the net (and the baseline) on random input")
    p.add_argument("--weights", help="with --measure: a .caffemodel to load into the net (random blobs otherwise)")
    p.add_argument("--batch", type=int, help="with --measure: images per forward (default: the net's batch size)")
    p.add_argument("--warmup", type=int, help="with --measure: untimed forwards first (default 3)")
    p.add_argument("--repeats", type=int, help="with --measure: timed forwards (default 10)")
    p.add_argument("--device", "--gpu", dest="device",
                   help=f"with --measure: {DEVICE_HELP} (default cuda when available, else cpu)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    fmt.add_argument("--csv", action="store_true", help="print CSV (per-layer rows, then totals rows)")
    p.add_argument("--allow-unknown-fields", action="store_true",
                   help="skip fields this Caffe schema does not know (fork-only fields) with a warning")
    add_input_shape(p)
    add_source(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.measure:
        given = [f"--{name}" for name in ("weights", "batch", "warmup", "repeats", "device")
                 if getattr(args, name) is not None]
        if given:
            raise SlimError(f"{', '.join(given)} only apply to timing; add --measure or remove "
                            f"{'it' if len(given) == 1 else 'them'}.")
    notes = []

    def graph(path, phase, strict=True):  # built where its data may be absent (slim.offline); notes said below
        built, said = build_offline(path, phase, input_shapes=args.input_shape, sources=args.source,
                                    allow_unknown_fields=args.allow_unknown_fields, strict=strict)
        notes.extend(said)
        return built

    net = graph(args.model, args.phase)
    base = graph(args.baseline, args.phase, strict=False) if args.baseline else None
    timed = [net, base]
    if args.measure and args.phase != "TEST":  # --measure times the deploy net of the TEST phase
        timed = [graph(args.model, "TEST"), graph(args.baseline, "TEST", strict=False) if args.baseline else None]
    warn("calflop", notes)
    report = calflop(net)
    baseline = calflop(base) if base is not None else None
    latency = baseline_latency = None
    if args.measure:
        # Both nets run at the same batch size, so their medians compare like for like.
        timing = dict(batch=args.batch or report.batch, warmup=3 if args.warmup is None else args.warmup,
                      repeats=10 if args.repeats is None else args.repeats,
                      device=None if args.device is None else resolve_device(args.device),
                      allow_unknown_fields=args.allow_unknown_fields)
        if args.baseline:
            # Interleaved runs, so drift on a shared machine does not skew the measured speed-up.
            latency, baseline_latency = measure_latencies(timed, weights=[args.weights, None], **timing)
        else:
            latency = measure_latency(timed[0], weights=args.weights, **timing)
    comparison = None
    if baseline is not None:
        comparison = compare(report, baseline, latency=latency, baseline_latency=baseline_latency)
    if args.json:
        print(json.dumps(to_json(report, comparison, latency), indent=1))
    elif args.csv:
        print(to_csv(report, comparison, latency), end="")
    else:
        print(format_text(report, comparison, latency))
    return 0
