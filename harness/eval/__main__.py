"""`python -m harness.eval`: the dense model on the benchmarks (see cli.py)."""

import sys

from harness.eval.cli import main

sys.exit(main())
