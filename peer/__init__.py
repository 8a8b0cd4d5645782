"""pccl.peer: the peer client (master session, p2p links, ring runner, communicators)."""

from pccl.peer.blocking import Communicator
from pccl.peer.communicator import Communicator as AioCommunicator

__all__ = ["AioCommunicator", "Communicator"]
