"""``slim export NET [--weights W] --onnx OUT.onnx``: a slim net (deploy, train/val through its deploy form, pruned)
as an ONNX file with a dynamic batch and the net's output names, checked against ONNX Runtime when installed."""


def register(sub):
    from slim.interop.onnx_export import DEFAULT_OPSET, EXPORTERS

    p = sub.add_parser("export", help="write a net as ONNX (dynamic batch, checked against ONNX Runtime)",
                       description=__doc__.splitlines()[0])
    p.add_argument("model", help="net prototxt (deploy or train/val)")
    p.add_argument("--weights", "-w", help=".caffemodel for the net (default: the fillers' values)")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="torch's exporter: dynamo (default, needs onnxscript) or legacy (TorchScript-based)")
    p.add_argument("--input-shape", action="append", default=[], metavar="TOP:C,H,W",
                   help="per-sample shape of a data top when it cannot be derived (repeatable)")
    p.add_argument("--no-check", action="store_true", help="do not compare with ONNX Runtime")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest difference from slim allowed, relative to the largest output (default 1e-4)")
    p.add_argument("--allow-unknown-fields", action="store_true", help="skip unknown prototxt fields with a warning")
    p.set_defaults(func=run)


def run(args) -> int:
    from slim.commands.deploy import _shapes
    from slim.interop.onnx_export import export_onnx

    # Written atomically: a failure, or a check beyond --tolerance, leaves any previous file as it was.
    result = export_onnx(args.model, args.onnx, weights=args.weights, opset=args.opset, exporter=args.exporter,
                         input_shapes=_shapes(args.input_shape) or None, check=not args.no_check,
                         tolerance=args.tolerance, allow_unknown_fields=args.allow_unknown_fields)
    if args.weights is None:
        print(f"note: no --weights given; {args.onnx} holds the fillers' values")
    print(result)
    return 0
