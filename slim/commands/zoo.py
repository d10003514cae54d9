"""``slim zoo``: write the model zoo's prototxt files (train/test and deploy) from slim/zoo.py."""

import sys
from pathlib import Path


def register(sub):
    p = sub.add_parser("zoo", help="write (or check, or list) the model zoo's prototxt files")
    p.add_argument("names", nargs="*", help="zoo nets to write (default: all)")
    p.add_argument("--out", "--output", "-o", dest="out", default="nets", help="output folder (default: nets)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is missing or stale")
    p.add_argument("--list", action="store_true", help="list the zoo and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from slim.errors import SlimError
    from slim.zoo import ABOUT, ZOO, stale_zoo_files, write_zoo
    if args.check and args.names:
        raise SlimError("--check compares the whole zoo; give no names with it.")
    unknown = [n for n in args.names if n not in ZOO]
    if unknown:
        raise SlimError(f"unknown zoo net(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}.")
    if args.list:
        for name, about in ABOUT.items():
            print(f"{name:<24} {about.title}")
        return 0
    if args.check:
        stale = stale_zoo_files(args.out)
        for file_name in stale:
            print(f"{Path(args.out) / file_name} is missing or stale; run slim zoo --out {args.out}", file=sys.stderr)
        return 1 if stale else 0
    for path in write_zoo(args.out, args.names or None):
        print(path)
    return 0
