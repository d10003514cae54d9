"""``slim demo``: the whole network-slimming loop on the built-in digits, on the CPU (see slim/demo.py)."""


def register(sub):
    p = sub.add_parser("demo", help="baseline, sparse training, pruning and fine-tuning on the built-in digits")
    p.add_argument("--out", "--output", "-o", dest="out", default="slim_demo",
                   help="folder for the prototxts, caffemodels, report and plots (default slim_demo)")
    p.add_argument("--percent", type=float, default=0.6, help="fraction of channels to prune (default 0.6)")
    p.add_argument("--iterations", type=int, default=800, help="iterations of each training stage (default 800)")
    p.add_argument("--repeats", type=int, default=30, help="timed forward runs per net for the latency (default 30)")
    p.add_argument("--verbose", action="store_true", help="show the solvers' Caffe-style logs")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    from slim.demo import run_demo
    from slim.errors import SlimError
    if not 0 <= args.percent < 1:
        raise SlimError(f"--percent must be in [0, 1), found {args.percent}.")
    if args.iterations < 8:
        raise SlimError(f"--iterations must be at least 8, found {args.iterations}.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if getattr(args, "threads_choice", None):
        logging.getLogger("slim").info("Using %s", args.threads_choice)
    result = run_demo(args.out, percent=args.percent, max_iter=args.iterations, measure_repeats=args.repeats,
                      verbose=args.verbose)
    print()
    print(result.table())
    print()
    print(f"files in {result.out_dir}/: prototxts, caffemodels, {result.files['report']}, {result.files['plots']}")
    return 0
