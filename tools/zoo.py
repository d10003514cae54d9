#!/usr/bin/env python3
"""Write the model zoo's prototxt files into nets/ (same as ``slim zoo``).

    python tools/zoo.py                    # (re)write every net into nets/
    python tools/zoo.py --out DIR vgg19_cifar10 resnet56_cifar10
    python tools/zoo.py --check            # exit 1 if a file in nets/ is missing or stale
    python tools/zoo.py --list             # the zoo's names and what they are
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from slim.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(ROOT / "nets")]
    sys.exit(main(["zoo", *args]))
