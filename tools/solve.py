#!/usr/bin/env python
"""Caffe-style script: ``python tools/solve.py --solver S.prototxt [--weights W | --snapshot S] [--gpus IDS]``.

A thin wrapper over ``slim train`` (see ``slim train --help``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
