"""`python -m swapd` is the `swapd` command."""

import sys

from swapd.cli import main

sys.exit(main())
