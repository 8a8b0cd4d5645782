"""``python -m pccl.master ARGS``: the same as ``pccl master ARGS``."""

import sys

from pccl.master.cli import main

sys.exit(main())
