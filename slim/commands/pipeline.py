"""``slim pipeline``: sparse training, pruning and fine-tuning chained (multi-pass with --passes)."""

from slim.commands._args import DEVICE_HELP, add_source, resolve_device


def register(sub):
    p = sub.add_parser("pipeline", help="sparse training -> prune -> fine-tune, repeated --passes times")
    p.add_argument("--solver", required=True, help="the sparse-training solver (its net: is the net to slim)")
    p.add_argument("--finetune-solver", required=True, help="the fine-tuning solver (its net is replaced by the "
                                                             "pruned net)")
    p.add_argument("--percent", type=float, required=True, help="fraction of channels to prune in each pass")
    p.add_argument("--passes", type=int, default=1, help="number of sparse/prune/fine-tune passes (default 1)")
    p.add_argument("--weights", help="initial weights for the first sparse training")
    p.add_argument("--out", "--output", "-o", dest="out", default="pipeline", help="output folder (default pipeline)")
    p.add_argument("--criterion", default="slimming", help="importance criterion (default slimming)")
    p.add_argument("--max-prune-per-layer", type=float, default=1.0,
                   help="at most this fraction of any layer per pass (the paper's multi-pass used 0.5)")
    p.add_argument("--absorb-bias", action="store_true", help="fold removed channels' constants into next biases")
    p.add_argument("--device", "--gpu", dest="device", help=f"where to train: {DEVICE_HELP} (default cpu)")
    add_source(p)
    p.add_argument("--allow-unknown-fields", action="store_true",
                   help="skip fields this Caffe schema does not know (a Caffe fork's) in the solvers and the net, with "
                        "a warning; the net as read is written to OUT/input_net.prototxt")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import logging

    from slim.pipeline import run_pipeline
    from slim.solver.logs import setup_logging
    setup_logging(progress=False)           # the train command's glog lines, which Caffe's parse_log reads
    if getattr(args, "threads_choice", None):
        logging.getLogger("slim").info("Using %s", args.threads_choice)
    report = run_pipeline(args.solver, args.finetune_solver, args.percent, passes=args.passes, out_dir=args.out,
                          weights=args.weights, absorb_bias=args.absorb_bias,
                          policy_kwargs={"criterion": args.criterion, "max_prune": args.max_prune_per_layer},
                          device=resolve_device(args.device), sources=args.source,
                          allow_unknown_fields=args.allow_unknown_fields)
    print(json.dumps(report["passes"], indent=2))
    return 0
