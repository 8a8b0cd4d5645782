"""pccl.master: the master daemon (membership, votes, ring order, abort decisions).

Never touches tensor bytes. ``Master`` is the in-process entry point; ``pccl master`` the CLI.
"""

from pccl.master.daemon import Master
from pccl.master.state import MasterState

__all__ = ["Master", "MasterState"]
