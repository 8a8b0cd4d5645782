"""Asyncio API: ``pccl.aio.Communicator`` has the blocking API's methods as coroutines."""

from pccl.peer.communicator import Communicator, ReduceHandle

__all__ = ["Communicator", "ReduceHandle"]
