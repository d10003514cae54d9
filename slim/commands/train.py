"""``slim train --solver S.prototxt [--weights W | --snapshot S] [--gpus 0,1|all | --procs N]`` (caffe train)."""

import logging
import os

from slim.commands._args import add_source
from slim.errors import SolverError


def register(sub):
    p = sub.add_parser("train", help="train a net with a Caffe solver prototxt (caffe train)",
                       description="Train as `caffe train` does: the solver prototxt names the nets, the schedule and "
                                   "the snapshots; logs use Caffe's lines. Also runs under torchrun "
                                   "(`torchrun --nproc_per_node N -m slim train ...`).")
    p.add_argument("--solver", required=True, help="the solver prototxt")
    # --weights and --snapshot exclude each other; train() says so in one sentence (no argparse usage dump).
    p.add_argument("--weights", help="comma-separated .caffemodel files to fine-tune from (overrides the solver's "
                                     "weights field)")
    p.add_argument("--snapshot", help="a .solverstate to resume training from")
    p.add_argument("--gpus", "--gpu", dest="gpus", metavar="IDS",
                   help="GPUs to train on: '0', '0,1,2,3' or 'all' (one process per GPU, NCCL)")
    p.add_argument("--procs", type=int, metavar="N", help="train with N CPU processes (gloo)")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (fp16 uses a gradient scaler)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the train net (eager if it fails)")
    p.add_argument("--sigint-effect", default="stop", choices=["stop", "snapshot", "none"],
                   help="what SIGINT (Ctrl-C) does (default stop, as Caffe)")
    p.add_argument("--sighup-effect", default="snapshot", choices=["stop", "snapshot", "none"],
                   help="what SIGHUP does (default snapshot, as Caffe)")
    p.add_argument("--stage", action="append", default=[],
                   help="NetState stage of the train net (repeatable, or comma-separated)")
    p.add_argument("--level", type=int, default=0, help="NetState level of the train net")
    p.add_argument("--quiet", action="store_true", help="log warnings only, no progress bar")
    add_source(p)
    p.add_argument("--allow-unknown-fields", action="store_true",
                   help="skip fields this Caffe schema does not know (a Caffe fork's) in the solver and its nets, "
                        "with a warning")
    p.set_defaults(func=run)


def parse_gpus(text):
    """'all' -> [] (every GPU); '0,1' -> [0, 1]; None -> None (CPU)."""
    if text is None:
        return None
    if text.strip() == "all":
        return []
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SolverError(f"--gpus must be 'all' or comma-separated GPU ids such as 0,1; found \"{text}\".") from None
    if not ids:
        raise SolverError("--gpus is empty; give 'all' or GPU ids such as 0,1.")
    return ids


def run(args) -> int:
    from slim.solver.logs import setup_logging
    from slim.solver.train import TrainConfig, train

    rank = int(os.environ.get("RANK", "0") or 0)
    progress = setup_logging(rank, level=logging.WARNING if args.quiet else logging.INFO, progress=not args.quiet)
    if getattr(args, "threads_choice", None) and args.gpus is None:
        logging.getLogger("slim").info("Using %s", args.threads_choice)
    weights = [w for w in args.weights.split(",") if w.strip()] if args.weights is not None else None
    stages = [s.strip() for entry in args.stage for s in entry.split(",") if s.strip()]
    config = TrainConfig(args.solver, weights=weights, snapshot=args.snapshot, gpus=parse_gpus(args.gpus),
                         procs=args.procs, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                         sigint_effect=args.sigint_effect, sighup_effect=args.sighup_effect, stages=stages,
                         level=args.level, sources=args.source, allow_unknown_fields=args.allow_unknown_fields,
                         log_level=logging.WARNING if args.quiet else logging.INFO, progress=not args.quiet)
    train(config, progress=progress)
    return 0
