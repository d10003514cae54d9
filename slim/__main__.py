"""``python -m slim ...`` (and ``torchrun ... -m slim train ...``) runs the slim command."""

import sys

from slim.cli import main

sys.exit(main())
