"""The peer's side of the key-value channel (``kv_set``, ``kv_get``, ``kv_wait``, ``kv_delete``).

Each request carries an id; the master answers it with one ``M2P_KV_REPLY`` (see
:mod:`pccl.master.kv` for the semantics and bounds, ``docs/protocol.md`` for the wire). A reply
for an id this peer no longer waits on (it gave up) is dropped.

Every call has a deadline. A call whose master link breaks (the master restarted, or the link
dropped) waits for the session to reconnect and sends the request again, within the same
deadline: every request is idempotent (a set stores the same value again, a get reads again,
a wait waits again), and an acknowledged set is durable on a master that runs with a state
file, so a master restart is invisible to a caller except for the time it takes. A session
that ends raises its error.

Runs on the peer's event loop; arguments are checked before any I/O (``ValueError``,
``TypeError``).
"""

from __future__ import annotations

import asyncio
import itertools
import time

from pccl.peer.session import MasterSession

from pccl import messages as m
from pccl.config import MAX_KV_KEY, MAX_KV_VALUE
from pccl.errors import ConnectionLost, KVRefused, PCCLError
from pccl.frame import MsgType
from pccl.messages import KvScope, KvStatus

__all__ = ["DEFAULT_KV_TIMEOUT_S", "KvClient", "check_key", "check_scope", "check_value"]

#: Deadline of ``kv_set``/``kv_get``/``kv_delete`` when the caller gives none (covers a master
#: restart: the peers' reconnection budget is shorter).
DEFAULT_KV_TIMEOUT_S = 60.0
#: How much longer than the wait it asked the master for a peer waits for the master's answer.
WAIT_SLACK_S = 5.0


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("key must not be empty")
    n = len(key.encode())
    if n > MAX_KV_KEY:
        raise ValueError(f"key is {n} bytes of UTF-8; at most {MAX_KV_KEY}")
    return key


def check_value(value: object) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"value must be bytes or str, got {type(value).__name__}")
    data = bytes(value)
    if len(data) > MAX_KV_VALUE:
        raise ValueError(f"value is {len(data)} bytes; at most {MAX_KV_VALUE}")
    return data


def check_scope(scope: object) -> KvScope:
    if scope == "run":
        return KvScope.RUN
    if scope == "group":
        return KvScope.GROUP
    raise ValueError(f"scope must be 'run' or 'group', got {scope!r}")


def check_timeout(timeout: object, name: str = "timeout") -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(timeout).__name__}")
    if not 0 <= timeout <= 24 * 3600:
        raise ValueError(f"{name} must be within 0..86400 seconds, got {timeout!r}")
    return float(timeout)


class KvClient:
    """Requests to the master's key-value channel over ``session``."""

    def __init__(self, session: MasterSession) -> None:
        self.session = session
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[m.KvReply]] = {}
        session.subscribe({MsgType.M2P_KV_REPLY: self._on_reply})
        session.on_link_lost(self._on_link_lost)

    def _on_reply(self, msg: m.Message) -> None:
        assert isinstance(msg, m.KvReply)
        fut = self._pending.pop(msg.req, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _on_link_lost(self, err: PCCLError) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # retrieved: the caller may have given up

    async def request(
        self, build: type[m.KvSet] | type[m.KvGet], deadline: float, **fields: object
    ) -> m.KvReply:
        """Send ``build(req=..., **fields)`` until one is answered or ``deadline`` (monotonic)
        passes; resend after a broken master link.

        Raises:
            TimeoutError: no answer before the deadline.
            PCCLError: the session ended (its error).
        """
        loop = asyncio.get_running_loop()
        while True:
            s = self.session
            s.check_usable()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the master did not answer the key-value request in time")
            try:
                async with asyncio.timeout(left):
                    await s.await_link()
                    req = next(self._ids)
                    fut: asyncio.Future[m.KvReply] = loop.create_future()
                    self._pending[req] = fut
                    try:
                        s.send(build(req=req, **fields))  # type: ignore[arg-type]
                        return await fut
                    finally:
                        self._pending.pop(req, None)
            except TimeoutError:
                raise TimeoutError(
                    "the master did not answer the key-value request in time"
                ) from None
            except ConnectionLost:
                if s.error is not None:
                    raise s.error from None
                # The link broke: the session reconnects (await_link above); ask again.
                await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ operations

    async def set(self, key: str, value: bytes, scope: KvScope, timeout: float) -> int:
        reply = await self.request(
            m.KvSet, time.monotonic() + timeout, scope=int(scope), key=key, value=value
        )
        if reply.status != KvStatus.OK:
            raise _refused(reply, key)
        return reply.version

    async def delete(self, key: str, scope: KvScope, timeout: float) -> bool:
        reply = await self.request(
            m.KvSet, time.monotonic() + timeout, scope=int(scope), key=key, delete=True
        )
        if reply.status == KvStatus.NOT_FOUND:
            return False
        if reply.status != KvStatus.OK:
            raise _refused(reply, key)
        return True

    async def get(
        self, key: str, scope: KvScope, timeout: float, wait: float = 0.0, after: int = 0
    ) -> tuple[bytes, int] | None:
        """``(value, version)``, or None: not found (``wait == 0``) or nothing newer than
        ``after`` within ``wait`` seconds."""
        end = time.monotonic() + wait
        deadline = end + (WAIT_SLACK_S if wait else timeout)
        while True:
            left_ms = max(0, int((end - time.monotonic()) * 1000)) if wait else 0
            reply = await self.request(
                m.KvGet,
                deadline,
                scope=int(scope),
                key=key,
                wait_ms=left_ms,
                after_version=after,
            )
            if reply.status == KvStatus.OK:
                return reply.value, reply.version
            if reply.status == KvStatus.NOT_FOUND:
                return None
            if reply.status == KvStatus.TIMEOUT:
                if wait and time.monotonic() < end - 0.05:
                    continue  # a restarted master answered early for a shorter wait: go on
                return None
            raise _refused(reply, key)


def _refused(reply: m.KvReply, key: str) -> KVRefused:
    return KVRefused(
        f"the master refused the key-value request for {key!r}: "
        f"{reply.reason or KvStatus(reply.status).name.lower()}",
        phase="kv",
    )
