"""The blocking facade ``pccl.Communicator``.

Runs one event loop (uvloop where available) in a daemon thread and forwards each call to the
asyncio :class:`pccl.peer.communicator.Communicator` on it. Calls may come from any thread; each
blocks the caller until the coroutine finishes (every coroutine has its own deadline). Heartbeats
keep flowing while the caller computes, so a busy training step is not mistaken for a hang.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from pccl.peer.communicator import Communicator as AioCommunicator
from pccl.peer.communicator import GateHandle, ReduceHandle
from prometheus_client.registry import CollectorRegistry

from pccl.config import Config
from pccl.errors import ConnectionLost
from pccl.shared_state import SharedState
from pccl.tls import TLSConfig
from pccl.types import GateResult, Quantization, ReduceInfo, ReduceOp, SyncInfo, SyncStrategy

__all__ = ["Communicator", "ReduceFuture", "new_event_loop"]

T = TypeVar("T")

_OPEN: weakref.WeakSet[Communicator] = weakref.WeakSet()


@atexit.register
def _close_open_communicators() -> None:
    """Stop every loop thread before interpreter finalisation: a daemon thread still running
    Python code (timers, heartbeats) after ``Py_FinalizeEx`` crashes the process."""
    for comm in list(_OPEN):
        try:
            comm.close()
        except Exception:  # pragma: no cover - best effort at exit
            pass


#: Signals after which a peer leaves the run cleanly before the process goes on to die.
LEAVE_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_previous: dict[int, Any] = {}  # signal -> the handler ours replaced


def _leave_and_resignal(signum: int, frame: Any) -> None:
    """SIGTERM/SIGINT: every open communicator tells the master it leaves (its group sees a
    departure at once, not a crash found by a heartbeat timeout), then the signal does what it
    did before: SIGTERM terminates, SIGINT raises KeyboardInterrupt."""
    name = signal.Signals(signum).name
    for comm in list(_OPEN):
        try:
            comm.close(reason=f"received {name}", timeout=2.0)
        except Exception:  # pragma: no cover - best effort: the process is going down
            pass
    prev = _previous.pop(signum, signal.SIG_DFL)
    signal.signal(signum, prev)
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def _install_leave_handlers() -> None:
    """Install :func:`_leave_and_resignal` for the signals whose handler is still Python's
    default (an application's own handler is left alone); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in LEAVE_SIGNALS:
        cur = signal.getsignal(sig)
        if cur is _leave_and_resignal:
            continue
        if cur == signal.SIG_DFL or cur is signal.default_int_handler:
            _previous[sig] = cur
            signal.signal(sig, _leave_and_resignal)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else the default asyncio loop."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a core dependency on Linux/macOS
        return asyncio.new_event_loop()


#: How long close() lets operations still in flight end on their own before cancelling them.
_SETTLE_S = 2.0


async def _settle_tasks(grace_s: float) -> None:
    """End every other task of this communicator's loop, as ``asyncio.run`` does at exit: an
    ``all_reduce_async`` still in flight when the application closes fails (the session is gone)
    and its outcome is retrieved, so nothing is destroyed pending or logged as an unretrieved
    exception; tasks still running after ``grace_s`` are cancelled and awaited."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace_s)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=1.0)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: the caller's handle (if any) re-raises it


class ReduceFuture:
    """Handle of a blocking ``all_reduce_async``."""

    def __init__(self, fut: concurrent.futures.Future[ReduceInfo], tag: int) -> None:
        self._fut = fut
        self.tag = tag

    def done(self) -> bool:
        return self._fut.done()

    def wait(self, timeout: float | None = None) -> ReduceInfo:
        """Block until the operation finishes; raise what it raised.

        Raises:
            TimeoutError: ``timeout`` elapsed (the operation keeps running).
            ConnectionLost: the communicator was closed while the operation was in flight.
        """
        try:
            return self._fut.result(timeout)
        except concurrent.futures.CancelledError:
            raise ConnectionLost("communicator closed with the operation in flight") from None


class GateFuture:
    """Handle of a blocking ``quorum_gate_async``; ``mark_ready`` may be called from any
    thread."""

    def __init__(
        self,
        handle: GateHandle,
        loop: asyncio.AbstractEventLoop,
        fut: concurrent.futures.Future[Any],
    ) -> None:
        self._handle = handle
        self._loop = loop
        self._done = fut  # resolves (to None) when the decision is in
        self.tag = handle.tag

    def done(self) -> bool:
        return self._done.done()

    def mark_ready(self) -> None:
        """Tell the master this peer's contribution is ready (thread-safe, idempotent)."""
        try:
            self._loop.call_soon_threadsafe(self._handle.mark_ready)
        except RuntimeError:
            pass  # the loop is closed: the gate failed with it

    def on_quorum(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` (on the communicator's loop thread: keep it tiny and thread-safe)
        when the master says the quorum is in; see :meth:`pccl.aio.GateHandle.on_quorum`."""
        try:
            self._loop.call_soon_threadsafe(self._handle.on_quorum, cb)
        except RuntimeError:
            pass

    def wait_done(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for the decision without giving up on it."""
        try:
            self._done.result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        except BaseException:
            return True
        return True

    def wait(self, timeout: float | None = None) -> GateResult:
        """The decision; a ``timeout`` that expires withdraws the arrival (see
        :meth:`pccl.aio.GateHandle.wait`)."""
        fut = asyncio.run_coroutine_threadsafe(self._handle.wait(timeout), self._loop)
        return fut.result()


class Communicator:
    """Blocking peer client; see :class:`pccl.peer.communicator.Communicator` for arguments."""

    def __init__(
        self,
        master: str | None = None,
        peer_group: int = 0,
        streams: int = 4,
        *,
        config: Config | None = None,
        advertise_host: str = "",
        p2p_port: int = 0,
        advertise_port: int = 0,
        auth_token: bytes | str | None = None,
        tls: TLSConfig | None = None,
        metrics_port: int | None = None,
        leave_on_signals: bool = True,
    ) -> None:
        """``leave_on_signals``: on SIGTERM/SIGINT (a preempted spot machine, Ctrl-C), tell the
        master this peer leaves before the signal takes its usual effect, so its group sees a
        departure at once (installed at :meth:`connect`, from the main thread, only where the
        application kept Python's default handler)."""
        self._leave_on_signals = bool(leave_on_signals)
        self._aio = AioCommunicator(
            master,
            peer_group,
            streams,
            config=config,
            advertise_host=advertise_host,
            p2p_port=p2p_port,
            advertise_port=advertise_port,
            auth_token=auth_token,
            tls=tls,
            metrics_port=metrics_port,
        )
        self._loop = new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pccl-peer-loop", daemon=True
        )
        self._thread.start()
        self._closed = False
        _OPEN.add(self)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("communicator is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return fn(*args, **kwargs)

        return self._run(call())

    # ------------------------------------------------------------------ API

    def connect(self, timeout: float = 30.0) -> None:
        """See :meth:`pccl.aio.Communicator.connect`."""
        if self._leave_on_signals:
            _install_leave_handlers()
        self._run(self._aio.connect(timeout))

    def update_topology(self, timeout: float | None = None) -> None:
        """See :meth:`pccl.aio.Communicator.update_topology`."""
        self._run(self._aio.update_topology(timeout))

    def optimize_topology(
        self, timeout: float | None = None, *, min_gain: float = 0.1, reprobe: bool = False
    ) -> bool:
        """See :meth:`pccl.aio.Communicator.optimize_topology`."""
        return self._run(self._aio.optimize_topology(timeout, min_gain=min_gain, reprobe=reprobe))

    def wait_for_world(self, n: int, timeout: float = 60.0) -> None:
        """See :meth:`pccl.aio.Communicator.wait_for_world`."""
        self._run(self._aio.wait_for_world(n, timeout))

    def kv_set(
        self, key: str, value: bytes | str, *, scope: str = "run", timeout: float = 60.0
    ) -> int:
        """See :meth:`pccl.aio.Communicator.kv_set`."""
        return self._run(self._aio.kv_set(key, value, scope=scope, timeout=timeout))

    def kv_get(self, key: str, *, scope: str = "run", timeout: float = 60.0) -> bytes | None:
        """See :meth:`pccl.aio.Communicator.kv_get`."""
        return self._run(self._aio.kv_get(key, scope=scope, timeout=timeout))

    def kv_wait(
        self, key: str, timeout: float, *, scope: str = "run", after_version: int = 0
    ) -> bytes:
        """See :meth:`pccl.aio.Communicator.kv_wait`."""
        return self._run(self._aio.kv_wait(key, timeout, scope=scope, after_version=after_version))

    def kv_get_versioned(
        self, key: str, *, scope: str = "run", timeout: float = 60.0
    ) -> tuple[bytes, int] | None:
        """See :meth:`pccl.aio.Communicator.kv_get_versioned`."""
        return self._run(self._aio.kv_get_versioned(key, scope=scope, timeout=timeout))

    def kv_delete(self, key: str, *, scope: str = "run", timeout: float = 60.0) -> bool:
        """See :meth:`pccl.aio.Communicator.kv_delete`."""
        return self._run(self._aio.kv_delete(key, scope=scope, timeout=timeout))

    def all_reduce(
        self,
        send: Any,
        recv: Any = None,
        *,
        op: ReduceOp = ReduceOp.SUM,
        quantization: Quantization = Quantization.NONE,
        tag: int = 0,
    ) -> ReduceInfo:
        """See :meth:`pccl.aio.Communicator.all_reduce`."""
        return self._run(
            self._aio.all_reduce(send, recv, op=op, quantization=quantization, tag=tag)
        )

    def all_reduce_async(
        self,
        send: Any,
        recv: Any = None,
        *,
        op: ReduceOp = ReduceOp.SUM,
        quantization: Quantization = Quantization.NONE,
        tag: int = 0,
    ) -> ReduceFuture:
        """Start an all-reduce; validation errors raise here, the rest from ``wait()``."""
        handle: ReduceHandle = self._call(
            self._aio.all_reduce_async, send, recv, op=op, quantization=quantization, tag=tag
        )
        fut = asyncio.run_coroutine_threadsafe(handle.wait(), self._loop)
        return ReduceFuture(fut, tag)

    def quorum_gate_async(
        self, tag: int, *, ready: bool = False, min_quorum: int, grace_s: float = 0.0
    ) -> GateFuture:
        """See :meth:`pccl.aio.Communicator.quorum_gate_async`."""
        handle: GateHandle = self._call(
            self._aio.quorum_gate_async, tag, ready=ready, min_quorum=min_quorum, grace_s=grace_s
        )

        async def decided() -> None:
            await asyncio.wait([handle._st.done])

        return GateFuture(
            handle, self._loop, asyncio.run_coroutine_threadsafe(decided(), self._loop)
        )

    def quorum_gate(
        self,
        tag: int,
        *,
        ready: bool,
        min_quorum: int,
        grace_s: float = 0.0,
        timeout: float | None = None,
    ) -> GateResult:
        """See :meth:`pccl.aio.Communicator.quorum_gate`."""
        return self._run(
            self._aio.quorum_gate(
                tag, ready=ready, min_quorum=min_quorum, grace_s=grace_s, timeout=timeout
            )
        )

    def sync_shared_state(
        self,
        state: SharedState,
        strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
        *,
        timeout: float | None = None,
    ) -> SyncInfo:
        """See :meth:`pccl.aio.Communicator.sync_shared_state`."""
        return self._run(self._aio.sync_shared_state(state, strategy, timeout=timeout))

    def close(self, reason: str = "closed by the application", timeout: float = 10.0) -> None:
        """Leave the run and stop the background loop. Idempotent."""
        if self._closed:
            return
        try:
            self._run(self._aio.close(reason), timeout=timeout)
            self._run(_settle_tasks(_SETTLE_S), timeout=_SETTLE_S + 2.0)
        except (RuntimeError, TimeoutError):
            pass  # the loop is gone or wedged: nothing left to release gracefully
        finally:
            self._closed = True
            _OPEN.discard(self)
            self._aio._stop_metrics_server()  # also when the loop was wedged
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=5)
            if not self._thread.is_alive() and not self._loop.is_closed():
                self._loop.close()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter exit the loop thread may already be frozen: never block there.
        if not getattr(self, "_closed", True) and not sys.is_finalizing():
            try:
                self.close()
            except Exception:
                pass

    # ------------------------------------------------------------------ attributes

    @property
    def peer_id(self) -> int:
        return self._aio.peer_id

    @property
    def world_size(self) -> int:
        return self._aio.world_size

    @property
    def group_world_size(self) -> int:
        return self._aio.group_world_size

    @property
    def num_groups(self) -> int:
        return self._aio.num_groups

    @property
    def peer_group(self) -> int:
        return self._aio.peer_group

    @property
    def epoch(self) -> int:
        return self._aio.epoch

    @property
    def stale_frames(self) -> int:
        return self._aio.stale_frames

    def metrics(self) -> dict[str, int | float]:
        """See :meth:`pccl.aio.Communicator.metrics` (any thread; also after :meth:`close`)."""
        return self._aio.metrics()

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """See :attr:`pccl.aio.Communicator.metrics_registry`."""
        return self._aio.metrics_registry

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on (``metrics_port=``), or None when not serving."""
        return self._aio.metrics_port

    @property
    def aio(self) -> AioCommunicator:
        """The underlying asyncio communicator (use only from its loop)."""
        return self._aio
