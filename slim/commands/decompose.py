"""``slim decompose``: split convolutions (3C: spatial, channel, pruning, folding), fitted on calibration data.

    slim decompose --model NET --weights W --rank conv2_1=49 --rank conv3_1=110 --calib-net TRAIN --output OUT
    slim decompose --model NET --weights W --speedup 4 --method 3c --calib-net TRAIN --output OUT
    slim decompose --model NET --weights W --rank conv2=8 --method spatial --no-refit --output OUT   (no data)
"""

from __future__ import annotations

from slim.commands._args import add_model
from slim.commands._calibration import add_calibration_args, calibration_from_args
from slim.errors import DecomposeError

__all__ = ["register", "run"]


def _ranks(items, flag: str):
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise DecomposeError(f"{flag} takes LAYER=D (conv2_1=49); got {item!r}.")
        if name in out:
            raise DecomposeError(f"{flag} names {name!r} twice.")
        try:
            out[name] = int(value)
        except ValueError:
            raise DecomposeError(f"{flag} {item}: {value!r} is not a whole number of filters.") from None
    return out


def register(sub) -> None:
    p = sub.add_parser("decompose", help="split convolutions (3C: spatial and channel decomposition, pruning)",
                       description=__doc__.splitlines()[0])
    add_model(p, "net prototxt (train/test or deploy)")
    p.add_argument("--weights", "-w", help=".caffemodel matching the net")
    p.add_argument("--output", "-o", help="OUT: writes OUT.prototxt, OUT.caffemodel and OUT.json")
    what = p.add_argument_group("what to decompose")
    what.add_argument("--method", default="3c", choices=["spatial", "channel", "3c"],
                      help="spatial: k_h x 1 then 1 x k_w; channel: d' filters then 1 x 1; 3c (default): spatial, "
                           "then channel on the horizontal layer, channel pruning and folding (He et al. 2017)")
    what.add_argument("--rank", action="append", default=[], metavar="LAYER=D",
                      help="decompose LAYER with rank D: the vertical layer's filters (spatial, 3c; d' = d in 3c) or "
                           "d' (channel); repeatable")
    what.add_argument("--channel-rank", action="append", default=[], metavar="LAYER=D",
                      help="3c: d', the horizontal layer's filters, when not d (repeatable)")
    what.add_argument("--speedup", type=float,
                      help="original / decomposed conv+FC MACs of the net to reach within 1%%: ranks for the layers "
                           "without --rank, keeping the most of each layer's weight spectrum")
    what.add_argument("--layers", nargs="+", default=[], metavar="LAYER",
                      help="the layers --speedup may split (default: every convolution the method can split)")
    what.add_argument("--prune-ratio", type=float, metavar="R",
                      help="3C's channel pruning: decomposed layers read only by decomposed layers keep "
                           "max(floor(n / R), d') outputs (default 1.15 for 3c, none otherwise; 1: none)")
    what.add_argument("--no-refit", action="store_true",
                      help="the data-free SVD factors only (no calibration data; with 3c add --prune-ratio 1)")
    what.add_argument("--linear", action="store_true",
                      help="linear fits even where a ReLU follows (default: ReLU-aware, Zhang et al. 2016)")
    add_calibration_args(p, "calibration", "each decomposed layer")
    p.add_argument("--report", metavar="PATH", help="where to write the JSON report (default OUT.json)")
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"], help="NetState phase analysed")
    p.add_argument("--allow-unknown-fields", action="store_true",
                   help="skip fields this Caffe schema does not know (fork-only fields) with a warning")
    p.set_defaults(func=run)


def run(args) -> int:
    """Check the flag combination, decompose, write, print the report; 0 on success."""
    from slim.decompose import DecomposePolicy, decompose_net, write_decomposed

    if not args.weights:
        raise DecomposeError("--weights is required: the decomposition factors the trained blobs.")
    if not args.output:
        raise DecomposeError("--output OUT is required: slim decompose writes OUT.prototxt, OUT.caffemodel and "
                             "OUT.json.")
    policy = DecomposePolicy(method=args.method, ranks=_ranks(args.rank, "--rank"),
                             channel_ranks=_ranks(args.channel_rank, "--channel-rank"), speedup=args.speedup,
                             layers=tuple(args.layers), prune_ratio=args.prune_ratio, refit=not args.no_refit,
                             relu_aware=not args.linear)
    policy.check()
    calibration = calibration_from_args(args)
    result = decompose_net(args.model, args.weights, policy, calibration=calibration, phase=args.phase,
                           allow_unknown_fields=args.allow_unknown_fields)
    paths = write_decomposed(result, args.output, args.report)
    print(result.report)
    print(f"wrote {paths['prototxt']}, {paths['caffemodel']} and {paths['report']}")
    return 0
