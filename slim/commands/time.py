"""``slim time --model NET``: per-layer forward and backward milliseconds (Caffe's ``caffe time``)."""

from slim.commands._args import DEVICE_HELP, add_model, add_source, net_with_sources, resolve_device


def register(sub):
    p = sub.add_parser("time", help="per-layer forward/backward timing of a net (caffe time)")
    add_model(p, "net prototxt")
    p.add_argument("--weights", help="optional .caffemodel")
    p.add_argument("--iterations", type=int, default=50, help="timed iterations (default 50, as Caffe)")
    p.add_argument("--phase", default="TRAIN", choices=["TRAIN", "TEST"], help="net phase (default TRAIN, as Caffe)")
    p.add_argument("--device", "--gpu", dest="device", help=f"where to time: {DEVICE_HELP} (default cpu)")
    p.add_argument("--forward-only", action="store_true", help="skip the backward pass")
    p.add_argument("--allow-unknown-fields", action="store_true", help="skip unknown prototxt fields with a warning")
    add_source(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from slim.errors import SlimError
    from slim.net import Net
    from slim.timing import time_net
    if args.iterations <= 0:
        raise SlimError(f"--iterations must be positive, found {args.iterations}.")
    device = resolve_device(args.device)
    model = net_with_sources(args.model, args.source, phase=args.phase,
                             allow_unknown_fields=args.allow_unknown_fields)
    net = Net(model, weights=args.weights, phase=args.phase, device=device,
              allow_unknown_fields=args.allow_unknown_fields)
    print(time_net(net, args.iterations, backward=not args.forward_only))
    return 0
