"""``slim deploy NET``: derive the deploy net from a train/val net (data, loss and accuracy layers replaced by an
Input layer), as Caffe users otherwise do by hand."""

from slim.commands._args import add_model


def register(sub):
    p = sub.add_parser("deploy", help="derive a deploy prototxt from a train/val prototxt")
    add_model(p, "train/val net prototxt")
    p.add_argument("--output", "-o", help="where to write the deploy prototxt (default: print it)")
    p.add_argument("--input-shape", action="append", default=[], metavar="TOP:C,H,W",
                   help="per-sample shape of a data top when it cannot be derived (repeatable)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the Input layer (default 1)")
    p.add_argument("--opencv", action="store_true",
                   help="write for OpenCV's importer: FLOOR pooling as its ceil_mode: false (BVLC Caffe cannot read "
                        "that file; slim reads both). Implied when the input uses that spelling")
    p.add_argument("--softmax", action="store_true",
                   help="end each classifier with a Softmax layer 'prob', as BVLC's deploy files do (default: the "
                        "net ends at the logits)")
    p.add_argument("--allow-unknown-fields", action="store_true", help="skip unknown prototxt fields with a warning")
    p.set_defaults(func=run)


def _shapes(specs):
    from slim.errors import SlimError
    out = {}
    for spec in specs:
        top, sep, dims = spec.partition(":")
        try:
            if not sep:
                raise ValueError
            out[top] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise SlimError(f"--input-shape {spec!r} is not TOP:C,H,W (e.g. data:3,224,224).") from None
    return out


def run(args) -> int:
    from slim.deploy import make_deploy
    from slim.errors import SlimError
    from slim.io import net_to_text, read_net, write_net
    from slim.io.text import spells_ceil_mode
    if args.batch <= 0:
        raise SlimError(f"--batch must be positive, found {args.batch}.")
    deploy = make_deploy(read_net(args.model, allow_unknown_fields=args.allow_unknown_fields),
                         input_shapes=_shapes(args.input_shape) or None, batch=args.batch, softmax=args.softmax)
    opencv = args.opencv or spells_ceil_mode(args.model)    # keep the spelling of the reader the input was made for
    if args.output:
        write_net(deploy, args.output, opencv=opencv)
        print(f"wrote {args.output}")
    else:
        print(net_to_text(deploy, opencv=opencv), end="")
    return 0
