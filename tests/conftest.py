"""Shared fixtures: the real ``pccl master`` daemon and real peer worker processes on loopback.

``master`` starts ``python -m pccl.cli master --host 127.0.0.1 --port 0`` and reads the port it
announces; ``master_factory`` does the same with extra ``PCCL_*`` environment variables.
``workers`` spawns scripts from ``tests/workers/`` (one JSON event per stdout line, read by a
thread per process so a chatty worker never blocks on a full pipe) and waits for their events
with deadlines. Every process a test starts is killed at teardown, pass or fail; a master that
died during the test fails the test (no received byte may end a process).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pccl.tools.proc import spawn_master, stop, tail

WORKERS_DIR = Path(__file__).resolve().parent / "workers"
MASTER_START_TIMEOUT_S = 30.0


def _tail(path: Path, limit: int = 3000) -> str:
    return tail(path, limit) or "<no log>"


def kill_process(proc: subprocess.Popen[Any], grace_s: float = 0.0) -> None:
    """SIGTERM then SIGKILL after ``grace_s`` (or SIGKILL at once); reap. Works on stopped ones."""
    stop(proc, grace_s)


# ---------------------------------------------------------------------------------- master


@dataclass
class MasterProc:
    """A running ``pccl master`` subprocess."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    log: Path
    expect_exit: bool = False  # set by tests that stop the master on purpose

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log_tail(self) -> str:
        return _tail(self.log)


def _start_master(
    log: Path, env_overrides: dict[str, str], port: int = 0, extra_args: Sequence[str] = ()
) -> MasterProc:
    with log.open("wb") as err:
        try:
            proc, addr = spawn_master(
                None,
                port=port,
                extra_args=extra_args,
                env={**os.environ, **env_overrides},
                stderr=err,
                timeout=MASTER_START_TIMEOUT_S,
            )
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nmaster log:\n{_tail(log)}") from None
    host, _, port_s = addr.rpartition(":")
    return MasterProc(proc, host, int(port_s), log)


@pytest.fixture
def master_factory(tmp_path: Path) -> Iterator[Callable[..., MasterProc]]:
    """``start(**env)`` starts a master with extra environment (e.g. PCCL_HEARTBEAT_TIMEOUT_S);
    ``start(extra_args=[...])`` with more ``pccl master`` arguments."""
    started: list[MasterProc] = []

    def start(port: int = 0, extra_args: Sequence[str] = (), **env: str) -> MasterProc:
        m = _start_master(tmp_path / f"master{len(started)}.log", env, port, extra_args)
        started.append(m)
        return m

    yield start
    died = [(m, m.proc.poll()) for m in started if m.proc.poll() is not None and not m.expect_exit]
    for m in started:
        kill_process(m.proc, grace_s=3.0)
    if died:
        m, rc = died[0]
        pytest.fail(f"the master exited (rc={rc}) during the test\n{m.log_tail()}")


@pytest.fixture
def master(master_factory: Callable[..., MasterProc]) -> MasterProc:
    """A real master daemon on 127.0.0.1 with an OS-assigned port."""
    return master_factory()


# ---------------------------------------------------------------------------------- workers


@dataclass
class Worker:
    """One peer worker process and the JSON events it printed so far."""

    name: str
    proc: subprocess.Popen[bytes]
    stderr: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    eof: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def result(self) -> dict[str, Any] | None:
        """The final ``{"event": "result"}`` event, if printed."""
        for ev in self.events:
            if ev.get("event") == "result":
                return ev
        return None

    def stderr_tail(self) -> str:
        return _tail(self.stderr)


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A test run started as a background
    job of a non-interactive shell (``make test &``, nohup) inherits SIGINT ignored, and a
    worker that ignores it cannot show how a peer reacts to Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Workers:
    """Spawns worker scripts and waits for their events; see the module docstring."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.all: list[Worker] = []
        self._q: queue.Queue[tuple[Worker, dict[str, Any] | None]] = queue.Queue()
        self._master: MasterProc | None = None

    def spawn(
        self,
        script: str,
        master: MasterProc,
        params: dict[str, Any],
        *,
        name: str | None = None,
        env: dict[str, str] | None = None,
        stdin_pipe: bool = False,
    ) -> Worker:
        """Start ``tests/workers/<script>`` with ``argv = [master address, json(params)]``.

        stdin is ``/dev/null`` unless ``stdin_pipe`` (then ``worker.proc.stdin`` is writable).
        """
        self._master = master
        name = name or f"{Path(script).stem}{len(self.all)}"
        log = self.tmp_path / f"{name}.stderr"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(WORKERS_DIR / script), master.address, json.dumps(params)],
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=_default_sigint,
            )
        w = Worker(name, proc, log)
        self.all.append(w)
        threading.Thread(target=self._read, args=(w,), daemon=True).start()
        return w

    def _read(self, w: Worker) -> None:
        assert w.proc.stdout is not None
        for raw in w.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "text", "line": line}
            if not isinstance(ev, dict):
                ev = {"event": "text", "line": line}
            ev["_recv_t"] = time.monotonic()
            self._q.put((w, ev))
        self._q.put((w, None))

    def _pump(self, timeout: float) -> tuple[Worker, dict[str, Any] | None] | None:
        try:
            w, ev = self._q.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        if ev is None:
            w.eof = True
        else:
            w.events.append(ev)
        return w, ev

    def wait_event(
        self,
        pred: Callable[[Worker, dict[str, Any]], bool],
        timeout: float,
        what: str,
    ) -> tuple[Worker, dict[str, Any]]:
        """Return the first new event ``pred`` accepts; fail after ``timeout`` seconds.

        Events that arrived earlier (already in ``Worker.events``) are checked first.
        """
        for w in self.all:
            for ev in w.events:
                if pred(w, ev) and not ev.get("_consumed"):
                    ev["_consumed"] = True
                    return w, ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}\n" + self.report()
                )
            got = self._pump(left)
            if got is None:
                continue
            w, maybe_ev = got
            if maybe_ev is None:
                continue
            ev = maybe_ev
            if pred(w, ev):  # (a test may wait for an expected error)
                ev["_consumed"] = True
                return w, ev
            if ev.get("event") == "error":
                raise AssertionError(f"worker {w.name} failed: {ev}\n" + self.report())

    def wait_exit(self, workers: list[Worker], timeout: float) -> dict[str, dict[str, Any]]:
        """Wait until every worker exited; return ``{name: result event}``.

        Fails if one times out, exits non-zero, reports an error or prints no result.
        """
        deadline = time.monotonic() + timeout
        while not all(w.eof for w in workers):
            left = deadline - time.monotonic()
            if left <= 0:
                slow = [w.name for w in workers if not w.eof]
                raise AssertionError(
                    f"workers {slow} still running after {timeout}s\n" + self.report()
                )
            got = self._pump(min(left, 0.5))
            if got is not None and got[1] is not None and got[1].get("event") == "error":
                raise AssertionError(f"worker {got[0].name} failed: {got[1]}\n" + self.report())
        out: dict[str, dict[str, Any]] = {}
        for w in workers:
            try:
                rc = w.proc.wait(max(deadline - time.monotonic(), 5.0))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"worker {w.name} closed stdout but did not exit") from None
            errors = [ev for ev in w.events if ev.get("event") == "error"]
            res = w.result()
            if errors or rc != 0 or res is None:
                raise AssertionError(
                    f"worker {w.name} exited with rc={rc}, errors={errors}, "
                    f"result={res is not None}\n" + self.report()
                )
            out[w.name] = res
        return out

    def report(self) -> str:
        parts = []
        for w in self.all:
            parts.append(
                f"--- {w.name} (pid {w.pid}, rc {w.proc.poll()}) last events: "
                f"{[e.get('event') for e in w.events[-5:]]}\n{w.stderr_tail()}"
            )
        if self._master is not None:
            parts.append(f"--- master log\n{self._master.log_tail()}")
        return "\n".join(parts)

    def kill_all(self) -> None:
        for w in self.all:
            kill_process(w.proc)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """Spawner of peer worker processes; kills every one of them at teardown."""
    ws = Workers(tmp_path)
    try:
        yield ws
    finally:
        ws.kill_all()
