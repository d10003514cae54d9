#!/usr/bin/env python3
"""Write the model zoo's prototxt files (train/test and deploy) into nets/ from slim/zoo.py.

    python tools/zoo.py                    # (re)write every net into nets/
    python tools/zoo.py --out DIR vgg19_cifar10 resnet56_cifar10
    python tools/zoo.py --check            # exit 1 if a file in nets/ is missing or stale
    python tools/zoo.py --list             # the zoo's names and what they are
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from slim.zoo import ABOUT, ZOO, stale_zoo_files, write_zoo  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"zoo nets to write (default: all); one of {', '.join(ZOO)}")
    parser.add_argument("--out", default=str(ROOT / "nets"), help="output folder (default: nets/ of this checkout)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is missing or stale")
    parser.add_argument("--list", action="store_true", help="list the zoo and exit")
    args = parser.parse_args(argv)
    if args.check and args.names:
        parser.error("--check compares the whole zoo; give no names with it.")
    unknown = [n for n in args.names if n not in ZOO]
    if unknown:
        parser.error(f"unknown zoo net(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}.")
    if args.list:
        for name, about in ABOUT.items():
            print(f"{name:<24} {about.title}")
        return 0
    if args.check:
        stale = stale_zoo_files(args.out)
        for file_name in stale:
            print(f"{Path(args.out) / file_name} is missing or stale; run python tools/zoo.py", file=sys.stderr)
        return 1 if stale else 0
    for path in write_zoo(args.out, args.names or None):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
