"""``slim test --model NET --weights W --iterations N [--device D]``: score a net (caffe test)."""

import logging

from slim.commands._args import DEVICE_HELP, add_model, add_source, net_with_sources, resolve_device
from slim.errors import SlimError


def register(sub):
    p = sub.add_parser("test", help="score a trained net: per-batch and averaged outputs (caffe test)")
    add_model(p, "net prototxt (with data layers for the TEST phase)")
    p.add_argument("--weights", required=True, help="comma-separated .caffemodel files")
    p.add_argument("--iterations", type=int, default=50, help="forward passes (default 50, as Caffe)")
    p.add_argument("--device", "--gpu", dest="device", help=f"where to run: {DEVICE_HELP} (default cpu)")
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"], help="net phase (default TEST)")
    p.add_argument("--stage", action="append", default=[], help="NetState stage (repeatable, or comma-separated)")
    p.add_argument("--level", type=int, default=0, help="NetState level")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="run the forward passes under autocast")
    p.add_argument("--allow-unknown-fields", action="store_true", help="skip unknown prototxt fields with a warning")
    add_source(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from slim.net import Net
    from slim.solver.evaluate import evaluate
    from slim.solver.logs import fmt, setup_logging
    from slim.solver.precision import MixedPrecision

    if args.iterations <= 0:
        raise SlimError(f"--iterations must be positive, found {args.iterations}.")
    weights = [w for w in args.weights.split(",") if w.strip()]
    if not weights:
        raise SlimError("--weights is empty; slim test needs model weights to score (a .caffemodel).")
    setup_logging(progress=False)
    log = logging.getLogger("slim.commands.test")
    if getattr(args, "threads_choice", None):
        log.info("Using %s", args.threads_choice)
    device = resolve_device(args.device)
    stages = [s.strip() for entry in args.stage for s in entry.split(",") if s.strip()]
    model = net_with_sources(args.model, args.source, phase=args.phase, level=args.level, stages=stages,
                             allow_unknown_fields=args.allow_unknown_fields)
    net = Net(model, phase=args.phase, level=args.level, stages=stages, device=device,
              allow_unknown_fields=args.allow_unknown_fields)
    for w in weights:
        net.load_weights(w)
    log.info("Running for %d iterations.", args.iterations)

    def batch(i, scores):
        for s in scores:
            log.info("Batch %d, %s = %s", i, s.name, fmt(s.value))

    ev = evaluate(net, args.iterations, on_batch=batch, autocast=MixedPrecision(args.amp, device, []).autocast)
    log.info("Loss: %s", fmt(ev.loss))
    for s in ev.scores:
        log.info("%s", s)
    return 0
