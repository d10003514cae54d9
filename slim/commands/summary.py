"""``slim summary NET``: build a net and print its layers, wiring, top shapes and parameter count.

The net's data need not be on this machine: shapes the prototxt states are used (a warning line names each data
layer whose data is absent), ``--input-shape TOP:C,H,W`` gives the others, ``--source`` points a layer elsewhere.
"""

from slim.commands._args import add_input_shape, add_model, add_source, warn
from slim.offline import build_offline


def register(sub):
    p = sub.add_parser("summary", help="build a net and print its layers, shapes and parameter count")
    add_model(p, "net prototxt")
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"], help="NetState phase (default TEST)")
    p.add_argument("--stage", action="append", default=[], help="NetState stage (repeatable)")
    p.add_argument("--level", type=int, default=0, help="NetState level")
    p.add_argument("--allow-unknown-fields", action="store_true",
                   help="skip fields this Caffe schema does not know (fork-only fields) with a warning")
    add_input_shape(p)
    add_source(p)
    p.set_defaults(func=run)


def run(args) -> int:
    graph, notes = build_offline(args.model, args.phase, level=args.level, stages=args.stage,
                                 input_shapes=args.input_shape, sources=args.source,
                                 allow_unknown_fields=args.allow_unknown_fields)
    warn("summary", notes)
    print(graph.summary())
    return 0
