#!/usr/bin/env python
"""Caffe-style script: ``python tools/calflop.py NET [--baseline NET] [--measure] [--json|--csv]``.

A thin wrapper over ``slim calflop`` (see ``slim calflop --help`` and slim/flops.py for the conventions).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["calflop", *sys.argv[1:]]))
