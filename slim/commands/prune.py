"""``slim prune``: remove channels of any net slim can build, by its graph.

    slim prune --model NET --weights W --percent 0.7 --output OUT     -> OUT.prototxt, OUT.caffemodel, OUT.json
    slim prune --model NET --weights W --speedup 2 --output OUT
    slim prune --model NET --weights W --apply-report OUT.json --output AGAIN
    slim prune --model NET --explain                                   the channel groups, nothing written
"""

from __future__ import annotations

import re

from slim.commands._args import add_model
from slim.commands._calibration import add_calibration_args, calibration_from_args
from slim.errors import PruneError

__all__ = ["register", "run", "parse_count"]

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_count(text: str, flag: str = "--target-macs") -> float:
    """A number with an optional K/M/G/T suffix ("2.5e8", "250M", "1.2G")."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)\s*", text)
    if not m:
        raise PruneError(f"{flag} takes a number such as 2.5e8, 250M or 1.2G; got {text!r}.")
    return float(m.group(1)) * _SUFFIX[m.group(2).upper()]


def _min_channels(text):
    """--min-channels N (a count) or P% (a percentage of each group); None when not given (PrunePolicy's guard)."""
    if text is None:
        return None, 0.0
    text = text.strip()
    try:
        if text.endswith("%"):
            return 1, float(text[:-1]) / 100
        return int(text), 0.0
    except ValueError:
        raise PruneError(f"--min-channels takes a channel count (4) or a percentage (25%); got {text!r}.") from None


def _layer_percent(items):
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise PruneError(f"--layer-percent takes LAYER=FRACTION (conv3_1=0.5); got {item!r}.")
        try:
            out[name] = float(value)
        except ValueError:
            raise PruneError(f"--layer-percent {item}: {value!r} is not a fraction.") from None
    return out


def _layer_widths(items):
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            out[name] = int(value)
        except ValueError:
            name = ""
        if not sep or not name:
            raise PruneError(f"--layer-width takes LAYER=CHANNELS (conv1_1=24); got {item!r}.")
    return out


def register(sub) -> None:
    p = sub.add_parser("prune", help="remove channels: rewrite the prototxt and transplant the weights",
                       description=__doc__.splitlines()[0])
    add_model(p, "net prototxt (train/test or deploy)")
    p.add_argument("--weights", "-w", help=".caffemodel matching the net")
    p.add_argument("--output", "-o", help="OUT: writes OUT.prototxt, OUT.caffemodel and OUT.json")
    goal = p.add_argument_group("what to remove (one of)")
    goal.add_argument("--percent", type=float,
                      help="fraction of the prunable channels to remove, in [0, 1): floor(N x P) of the N channels "
                           "(a channel tied across layers by a sum counts once)")
    goal.add_argument("--target-macs", help="conv+FC multiply-accumulates per image to reach within 1%% (250M, 1.2G)")
    goal.add_argument("--speedup", type=float, help="original / pruned conv+FC MACs to reach within 1%%")
    goal.add_argument("--apply-report", metavar="REPORT", help="replay the kept channels of a report on this net")
    goal.add_argument("--explain", action="store_true", help="print the channel groups and exit")
    how = p.add_argument_group("how")
    how.add_argument("--criterion", default="slimming",
                     help="slimming (|Scale gamma|, default), l1 or l2 (filter norms), or lasso (He et al. 2017: "
                          "LASSO selection on calibration data and least-squares reconstruction of each reader)")
    how.add_argument("--tie-rule", default="union", choices=["union", "max", "mean", "sum"],
                     help="channels tied across layers: union (default) and max rank one by its strongest member")
    how.add_argument("--normalize", choices=["none", "mean", "max"],
                     help="scale each layer's scores by their mean or max before one global ranking (default: none "
                          "for slimming, mean for l1/l2, whose norms grow with fan-in)")
    how.add_argument("--policy", default="global", choices=["global", "layer"],
                     help="one ranking over the net (default) or --percent within each group")
    how.add_argument("--layer-percent", action="append", default=[], metavar="LAYER=P",
                     help="prune the group of LAYER's output channels by its own fraction (repeatable)")
    how.add_argument("--layer-width", action="append", default=[], metavar="LAYER=N",
                     help="keep exactly N output channels in LAYER's group (repeatable; replays a published plan)")
    how.add_argument("--min-channels", help="keep at least N channels (or P%%) per layer; default 1, and a global "
                                            "cut that would leave a layer with one channel is refused unless given")
    how.add_argument("--max-prune-per-layer", type=float, default=1.0, metavar="F",
                     help="remove at most this fraction of any layer in one pass (the paper's multi-pass: 0.5)")
    how.add_argument("--round-to", type=int, default=1, metavar="N",
                     help="round kept channels up to a multiple of N (8 for tensor cores)")
    how.add_argument("--protect", nargs="+", action="extend", default=[], metavar="LAYER",
                     help="layers whose output channels are never removed")
    how.add_argument("--absorb-bias", action="store_true",
                     help="fold each removed channel's constant output into the next layer's bias where exact")
    add_calibration_args(p, "calibration (--criterion lasso)", "each convolution", rank_tol=True)
    p.add_argument("--report", metavar="PATH", help="where to write the JSON report (default OUT.json)")
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"], help="NetState phase analysed")
    p.add_argument("--allow-unknown-fields", action="store_true",
                   help="skip fields this Caffe schema does not know (fork-only fields) with a warning")
    p.set_defaults(func=run)


def run(args) -> int:
    """Check the flag combination, prune (or explain), write, print the summary; 0 on success."""
    from slim.graph import build_graph
    from slim.io import read_net
    from slim.prune import PrunePolicy, PruneReport, analyze, prune_net, write_pruned

    if args.explain:
        net = read_net(args.model, allow_unknown_fields=args.allow_unknown_fields)
        analysis = analyze(build_graph(net, args.phase, source=args.model), args.protect)
        print(analysis.explain())
        if args.criterion == "lasso":
            from slim.prune.calibrate import Calibration
            from slim.prune.reconstruct import explain_lasso
            cal = Calibration(images=args.calib_images, samples_per_image=args.samples_per_image)
            cal.check()
            print("\n".join(explain_lasso(analysis.graph, analysis, cal)))
        return 0
    goals = [flag for flag, value in (("--percent", args.percent), ("--target-macs", args.target_macs),
                                      ("--speedup", args.speedup), ("--apply-report", args.apply_report))
             if value is not None]
    if len(goals) > 1:
        raise PruneError(f"Give one of --percent, --target-macs, --speedup and --apply-report, not "
                         f"{' and '.join(goals)}.")
    if not goals and not args.layer_percent and not args.layer_width:
        raise PruneError("Say what to remove: --percent P, --target-macs M, --speedup S, --layer-percent LAYER=P, "
                         "--layer-width LAYER=N or --apply-report REPORT (or --explain to see the channel groups).")
    if not args.weights:
        raise PruneError("--weights is required: the pruned channels are chosen from, and cut out of, the trained "
                         "blobs.")
    if not args.output:
        raise PruneError("--output OUT is required: slim prune writes OUT.prototxt, OUT.caffemodel and OUT.json.")
    replay = PruneReport.read(args.apply_report) if args.apply_report else None
    policy = None
    if replay is None:
        count, fraction = _min_channels(args.min_channels)
        policy = PrunePolicy(percent=args.percent, scope=args.policy, layer_percent=_layer_percent(args.layer_percent),
                             layer_widths=_layer_widths(args.layer_width),
                             target_macs=parse_count(args.target_macs) if args.target_macs is not None else None,
                             speedup=args.speedup, criterion=args.criterion, tie_rule=args.tie_rule,
                             normalize=args.normalize, min_channels=count, min_fraction=fraction,
                             max_prune=args.max_prune_per_layer, round_to=args.round_to, protect=tuple(args.protect))
        policy.check()
    calibration = None
    if policy is not None and policy.criterion == "lasso":
        calibration = calibration_from_args(args)
    elif args.source:
        raise PruneError(f"--source {args.source[0]} sets where --criterion lasso reads its calibration images; the "
                         f"other criteria read no data. Drop --source, or prune with --criterion lasso.")
    result = prune_net(args.model, args.weights, policy, absorb_bias=args.absorb_bias, replay=replay,
                       phase=args.phase, allow_unknown_fields=args.allow_unknown_fields, calibration=calibration)
    paths = write_pruned(result, args.output, args.report)
    print(result.report)
    print(f"wrote {paths['prototxt']}, {paths['caffemodel']} and {paths['report']}")
    return 0
