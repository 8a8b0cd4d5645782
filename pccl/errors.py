"""The pccl error hierarchy.

Every error pccl raises for a peer, network or protocol fault derives from :class:`PCCLError`.
Subclasses also inherit the builtin that fits (a lost connection is a ``ConnectionError``, a
deadline is a ``TimeoutError``), so generic handlers keep working. Errors carry the peer, tag and
phase they concern where known. Bad arguments are plain ``ValueError``/``TypeError`` raised before
any I/O. Pure data; safe on any thread.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "CollectiveAborted",
    "ConnectionLost",
    "KVRefused",
    "MasterUnreachable",
    "PCCLError",
    "PendingOperations",
    "ProtocolError",
    "SharedStateError",
    "TooFewPeers",
    "TopologyUpdateFailed",
    "VerdictUnknown",
]


class PCCLError(Exception):
    """Root of every pccl runtime error.

    Attributes:
        peer: id of the peer the error concerns, if known.
        tag: collective tag the error concerns, if any.
        phase: protocol phase in which it happened (``"connect"``, ``"all_reduce"``, ...).
        retryable: whether retrying the same call after ``update_topology()`` can succeed.
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        peer: int | None = None,
        tag: int | None = None,
        phase: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.peer = peer
        self.tag = tag
        self.phase = phase

    def __str__(self) -> str:
        ctx = [
            f"{k}={v}"
            for k, v in (("phase", self.phase), ("peer", self.peer), ("tag", self.tag))
            if v is not None
        ]
        return f"{self.message} ({', '.join(ctx)})" if ctx else self.message

    def __reduce__(self):  # keep keyword context across pickling (multiprocessing)
        return (_rebuild, (type(self), self.message, self.peer, self.tag, self.phase))


def _rebuild(cls, message, peer, tag, phase):
    return cls(message, peer=peer, tag=tag, phase=phase)


class MasterUnreachable(PCCLError, ConnectionError):
    """The master could not be reached (refused, unresolvable, or no answer before the deadline)."""

    retryable = True


class AuthenticationFailed(PCCLError, PermissionError):
    """The master or a peer rejected our credentials, or theirs failed verification."""


class TopologyUpdateFailed(PCCLError, ConnectionError):
    """A topology update could not complete (peers unreachable, or we were evicted)."""

    retryable = True


class CollectiveAborted(PCCLError, ConnectionError):
    """A peer left, hung or timed out mid-operation; the master aborted it on every peer.

    The caller's ``send`` buffer is intact (restored when in place). Call
    ``update_topology()`` and retry.
    """

    retryable = True


class TooFewPeers(PCCLError):
    """The operation needs at least two peers in the group."""


class SharedStateError(PCCLError):
    """Shared-state synchronisation failed (mismatch, rejected revision, unverifiable data)."""


class ProtocolError(PCCLError, ValueError):
    """Bytes received from the network did not form a valid message."""


class ConnectionLost(PCCLError, ConnectionError):
    """The connection to the master was lost or we were evicted; the communicator is closed."""


class PendingOperations(PCCLError, RuntimeError):
    """A call that needs an idle communicator was made while collectives are in flight."""


class VerdictUnknown(PCCLError, ConnectionError):
    """The ring completed on this peer, but the master's verdict was lost and cannot be
    recovered (the master restarted, or forgot the operation, before it could answer).

    The operation's result is kept: ``recv`` (the buffer itself when in place) holds the
    reduced bytes, which every peer whose ring completed holds identically; ``send`` of an
    out-of-place call is intact. Peers that received an abort verdict restored their input
    instead, so the group may disagree about this one operation: reconcile through shared
    state (``sync_shared_state`` elects one content and repairs the others), or redo the step.
    Not retryable as is: retrying an in-place call would reduce the already-reduced result.
    """

    retryable = False


class KVRefused(PCCLError, ValueError):
    """The master refused a key-value request: the store is full, or it could not persist the
    value (the reason says which). Not retryable as is: delete keys or raise the master's
    ``--kv-max-bytes``."""
