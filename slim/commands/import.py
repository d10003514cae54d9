"""``slim import MODEL.onnx --output OUT``: an ONNX CNN as OUT.prototxt + OUT.caffemodel, ready to train, prune and
export again; checked against ONNX Runtime (when installed) before anything is written."""


def register(sub):
    p = sub.add_parser("import", help="convert an ONNX model into a prototxt and caffemodel",
                       description=__doc__.splitlines()[0])
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--output", "-o", required=True, help="OUT: writes OUT.prototxt and OUT.caffemodel")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:C,H,W",
                   help="per-sample shape of an input with dynamic axes other than the batch (repeatable)")
    p.add_argument("--batch", type=int, help="batch size of the Input layer (default: the model's, or 1)")
    p.add_argument("--name", help="the net's name (default: the ONNX graph's or the file's)")
    p.add_argument("--no-check", action="store_true", help="do not compare with ONNX Runtime")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest difference from ONNX Runtime allowed, relative to the largest output (default 1e-4)")
    p.set_defaults(func=run)


def run(args) -> int:
    from slim.commands.deploy import _shapes
    from slim.interop._deps import available
    from slim.interop.onnx_import import check_imported, import_onnx, write_imported

    result = import_onnx(args.model, input_shapes=_shapes(args.input_shape) or None, batch=args.batch,
                         name=args.name)
    print(result)
    if args.no_check:
        print("not checked against ONNX Runtime (--no-check)")
    elif available("onnxruntime"):
        print(check_imported(result, args.model, tolerance=args.tolerance))
    else:
        print("not checked against ONNX Runtime (pip install onnxruntime to check)")
    proto, weights = write_imported(result, args.output)
    print(f"wrote {proto} and {weights}")
    return 0
