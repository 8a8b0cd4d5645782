#!/usr/bin/env python3
"""deploy/netns.py: the network-namespace harness (test hosts with their own addresses, link
cuts, ``tc tbf`` rate limits). The code ships with pccl as :mod:`pccl.tools.netns`; this file
is the same command for a checkout: ``sudo deploy/netns.py selftest``.
"""

import sys

from pccl.tools.netns import *  # noqa: F403
from pccl.tools.netns import main

if __name__ == "__main__":
    sys.exit(main())
