"""`python -m flexikern ...` (also under `torchrun -m flexikern ...`): the command line, see flexikern.cli."""

import sys

from flexikern.cli import main

sys.exit(main())
