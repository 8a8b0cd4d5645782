"""A scriptable shared-state peer, run as a real process by ``tests/test_shared_state.py``.

Started as ``python tests/state_workers/peer.py MASTER_ADDR``. The test drives it over stdin,
one JSON command per line (``{"id": 3, "op": "sync", ...}``), and reads one JSON object per
stdout line: ``{"event": "reply", "id": 3, ...}`` for each command, in order, plus unsolicited
probe events (``vote_sent``, ``signalled``). A command that raises replies with ``error`` (the
exception's class name) and ``message``; the worker keeps running, so a rejected sync can be
followed by a retry exactly as an application would.

Entry contents are derived from a seed alone (``fill``), so every process builds the same bytes
for the same seed without shipping data through the test. ``digests`` are XXH3-128 of the raw
bytes computed here, independently of ``pccl.SharedState.hashes()``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
import zlib
from typing import Any

import numpy as np
import xxhash
from pccl.peer import session as _comm_mod

import pccl
from pccl import messages as m

_out_lock = threading.Lock()
_corrupt_after_vote: list[Any] = []  # callbacks run on the loop thread after the next vote

NUMPY_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
}


def emit(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "t": time.monotonic(), **fields})
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def raw_bytes(obj: Any) -> np.ndarray:
    """Flat uint8 view of a numpy array or CPU torch tensor (shares memory)."""
    if not isinstance(obj, np.ndarray):
        import torch

        if obj.dtype == torch.bfloat16:
            obj = obj.view(torch.int16)
        obj = obj.numpy()
    return obj.reshape(-1).view(np.uint8)


def fill(obj: Any, seed: int) -> None:
    """Overwrite every byte of ``obj`` with a pattern that depends only on ``seed``."""
    raw = raw_bytes(obj)
    words = -(-raw.nbytes // 8)
    pat = np.arange(words, dtype=np.uint64)
    pat *= np.uint64(0x9E3779B97F4A7C15)
    pat ^= np.uint64((seed * 0x2545F4914F6CDD1D + 1) & 0xFFFF_FFFF_FFFF_FFFF)
    pat ^= pat >> np.uint64(29)
    raw[:] = pat.view(np.uint8)[: raw.nbytes]


def digest(obj: Any) -> str:
    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(raw_bytes(obj)).data)


def step_seed(name: str, k: int) -> int:
    return zlib.crc32(f"{name}:{k}".encode())


def make(spec: dict[str, Any]) -> Any:
    shape = tuple(spec["shape"])
    if spec.get("torch") or spec["dtype"] == "bfloat16":
        import torch

        obj: Any = torch.empty(shape, dtype=getattr(torch, spec["dtype"]))
    else:
        obj = np.empty(shape, dtype=NUMPY_DTYPES[spec["dtype"]])
    fill(obj, int(spec.get("seed", 0)))
    return obj


class Peer:
    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.comm: pccl.Communicator | None = None
        self.objs: dict[str, Any] = {}
        self.state: pccl.SharedState | None = None

    # ------------------------------------------------------------------ commands

    def op_connect(self, group: int = 0, timeout: float = 30.0, config: Any = None) -> dict:
        cfg = pccl.Config(**(config or {}))
        comm = self.comm = pccl.Communicator(self.addr, peer_group=group, config=cfg)

        def announce() -> None:
            # The master registers a peer in the same step as it welcomes it: once we have an
            # id, incumbents can admit us in one topology update.
            while not comm.aio.peer_id:
                time.sleep(0.001)
            emit("registered", peer_id=comm.aio.peer_id)

        threading.Thread(target=announce, daemon=True).start()
        comm.connect(timeout=timeout)
        return {"peer_id": self.comm.peer_id, "world_size": self.comm.world_size}

    def op_admit(self, world: int, timeout: float = 30.0) -> dict:
        """Vote in topology updates until ``world`` peers are in the run."""
        assert self.comm is not None
        self.comm.wait_for_world(world, timeout=timeout)
        return {"world_size": self.comm.world_size}

    def op_state(self, entries: list[dict[str, Any]], revision: int = 0, loose: Any = ()) -> dict:
        self.objs = {e["name"]: make(e) for e in entries}
        self.state = pccl.SharedState(self.objs, revision, allow_content_inequality=set(loose))
        return self._describe()

    def op_state_many(self, n: int, key_len: int, seed: int, revision: int = 0) -> dict:
        """``n`` tiny float32 entries with ``key_len``-character names (control-plane load)."""
        self.objs = {}
        for i in range(n):
            a = np.empty(2, np.float32)
            fill(a, seed * 1_000_003 + i)
            self.objs[f"{'k' * (key_len - 7)}.{i:06d}"] = a
        self.state = pccl.SharedState(self.objs, revision)
        return self._describe()

    def op_fill(self, name: str, seed: int) -> dict:
        fill(self.objs[name], seed)
        return self._describe()

    def op_step(self, k: int) -> dict:
        """Advance every non-opt-out entry to the content of step ``k`` (same on every peer)."""
        assert self.state is not None
        for name, e in self.state.entries.items():
            if not e.allow_content_inequality:
                fill(self.objs[name], step_seed(name, k))
        return self._describe()

    def op_bump(self, by: int = 1) -> dict:
        assert self.state is not None
        self.state.revision += by
        return self._describe()

    def op_sync(self, strategy: str = "ENFORCE_POPULAR", budget: float = 60.0) -> dict:
        """``sync_shared_state(timeout=budget)``; a PCCLError is reported, not raised."""
        assert self.comm is not None and self.state is not None
        t0 = time.monotonic()
        try:
            info = self.comm.sync_shared_state(
                self.state, pccl.SyncStrategy[strategy], timeout=budget
            )
        except pccl.PCCLError as e:
            out = self._describe()
            out.update(
                synced=False,
                error=type(e).__name__,
                shared_state_error=isinstance(e, pccl.SharedStateError),
                message=str(e),
                seconds=time.monotonic() - t0,
            )
            return out
        out = self._describe()
        out.update(
            synced=True,
            revision=info.revision,
            tx=info.tx_bytes,
            rx=info.rx_bytes,
            seconds=time.monotonic() - t0,
        )
        return out

    def op_describe(self) -> dict:
        return self._describe()

    def op_arm_signal(self, min_tx: int = 1, signal_name: str = "SIGKILL") -> dict:
        """Send ``signal_name`` to this very process once it has queued ``min_tx`` bytes of
        state for requesters in the current sync (emits ``signalled`` first; ``NONE``: only
        emit)."""
        assert self.comm is not None
        server = self.comm.aio._node.state_server
        sig = getattr(signal, signal_name) if signal_name != "NONE" else None

        def watch() -> None:
            while True:
                snap = server.snapshot
                if snap is not None and snap.tx_bytes >= min_tx:
                    emit("signalled", signal=signal_name, tx_bytes=snap.tx_bytes)
                    if sig is not None:
                        os.kill(os.getpid(), sig)
                    return
                time.sleep(0.0005)

        threading.Thread(target=watch, daemon=True).start()
        return {}

    def op_arm_corrupt(self, name: str, seed: int) -> dict:
        """Overwrite entry ``name`` right after the next vote left (a memory fault between
        hashing and serving): requesters then receive bytes that do not match the vote."""
        _corrupt_after_vote.append(lambda: fill(self.objs[name], seed))
        return {}

    def op_close(self) -> dict:
        if self.comm is not None:
            self.comm.close()
        return {}

    # ------------------------------------------------------------------ helpers

    def _describe(self) -> dict:
        st = self.state
        if st is None:
            return {}
        hashes = st.hashes()
        digests = {k: digest(v) for k, v in self.objs.items()}
        nbytes = {k: e.nbytes for k, e in st.entries.items()}
        if len(st) > MAX_LISTED:  # keep replies small: one digest over all (name, digest)
            hashes, digests = {"*": _combine(hashes)}, {"*": _combine(digests)}
            nbytes = {"*": st.nbytes}
        return {
            "state_revision": st.revision,
            "hashes": hashes,
            "digests": digests,
            "nbytes": nbytes,
        }


MAX_LISTED = 256


def _combine(d: dict[str, str]) -> str:
    text = "".join(f"{k}={v};" for k, v in sorted(d.items()))
    return xxhash.xxh3_128_hexdigest(text.encode())


def _probe_votes() -> None:
    """Test probe: report each shared-state vote right after it is written to the master."""
    orig = _comm_mod._MasterLink.send

    def send(self: Any, msg: m.Message) -> None:
        orig(self, msg)
        if isinstance(msg, m.SyncSharedState):
            while _corrupt_after_vote:
                _corrupt_after_vote.pop()()
            emit("vote_sent", revision=msg.revision, strategy=msg.strategy)

    _comm_mod._MasterLink.send = send  # type: ignore[method-assign]


def main() -> None:
    _probe_votes()
    peer = Peer(sys.argv[1])
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        cid, op = cmd.pop("id"), cmd.pop("op")
        if op == "exit":
            break
        try:
            res = getattr(peer, f"op_{op}")(**cmd)
            emit("reply", id=cid, op=op, **res)
        except Exception as e:
            emit(
                "reply",
                id=cid,
                op=op,
                error=type(e).__name__,
                message=str(e),
                traceback=traceback.format_exc(),
            )
    if peer.comm is not None:
        peer.comm.close()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
