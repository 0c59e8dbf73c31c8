"""`python -m swapd.loadgen`: the load generator's command line."""

import sys

from swapd.loadgen.cli import main

sys.exit(main())
