#!/usr/bin/env python
"""Caffe-style script: ``python tools/prune.py --model NET --weights W --percent 0.7 --output OUT``.

A thin wrapper over ``slim prune`` (see ``slim prune --help`` and slim/prune/ for groups, criteria and policies).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
