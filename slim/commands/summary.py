"""``slim summary NET``: build a net and print its layers, wiring, top shapes and parameter count."""

from slim.commands._args import add_model
from slim.graph import build_graph


def register(sub):
    p = sub.add_parser("summary", help="build a net and print its layers, shapes and parameter count")
    add_model(p, "net prototxt")
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"], help="NetState phase (default TEST)")
    p.add_argument("--stage", action="append", default=[], help="NetState stage (repeatable)")
    p.add_argument("--level", type=int, default=0, help="NetState level")
    p.add_argument("--allow-unknown-fields", action="store_true",
                   help="skip fields this Caffe schema does not know (fork-only fields) with a warning")
    p.set_defaults(func=run)


def run(args) -> int:
    graph = build_graph(args.model, args.phase, level=args.level, stages=args.stage,
                        allow_unknown_fields=args.allow_unknown_fields)
    print(graph.summary())
    return 0
