"""``python -m slim.caffe [--shadow] script.py [args...]``: run an unmodified pycaffe script on slim.

``import caffe`` in the script (and everything it imports) resolves to slim.caffe. A real Caffe that is importable
is left alone and the run refused, unless ``--shadow`` is given.
"""

import os
import runpy
import sys

from slim.caffe.alias import install_alias
from slim.errors import SlimError


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    shadow = False
    if args and args[0] == "--shadow":
        shadow, args = True, args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    try:
        install_alias(shadow=shadow)
    except SlimError as e:
        print(f"slim.caffe: {e}", file=sys.stderr)
        return 2
    sys.argv = args
    sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))   # as `python script.py` does
    runpy.run_path(args[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
