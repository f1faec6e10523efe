"""`python -m tidings ...`: the `tidings` command without its script."""

import sys

from tidings.cli import main

sys.exit(main())
