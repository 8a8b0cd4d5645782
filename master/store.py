"""What the master persists so that a restart neither reissues an id nor starts a second run.

A master restarted without memory would hand out peer ids from 1 again (ids the incumbents,
reconnecting a moment later, still hold) and would admit the first newcomer into a fresh run
beside the one that existed. :class:`RunStore` keeps the little that prevents both, in one
JSON file replaced atomically (write to a temporary file, fsync, rename):

- ``id_floor``: every peer id below it may have been issued. Ids are reserved in blocks
  (:data:`ID_BLOCK`) and the block is on disk before any id of it is handed out.
- ``members``: the accepted peers of the last formed epoch. A restarted master that finds
  members waits for them (their reconnect budget) before it lets newcomers form a run alone.

Pure file I/O, called from the master's event-loop thread (a few small writes per topology
change, never per message).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("pccl.master")

__all__ = ["ID_BLOCK", "RunRecord", "RunStore", "StoreError", "write_atomic"]

#: Peer ids reserved per write of the store.
ID_BLOCK = 256
#: Largest store file accepted (a record of 4096 members is about 40 KiB).
MAX_STORE_BYTES = 1 << 20
FORMAT = 1


class StoreError(RuntimeError):
    """The store file exists but cannot be read or parsed (refuse to start rather than guess)."""


@dataclass
class RunRecord:
    """The persisted part of the master's state."""

    id_floor: int = 1
    members: list[int] = field(default_factory=list)
    epoch: int = 0


class RunStore:
    """One JSON file holding a :class:`RunRecord`.

    Args:
        path: file to read at start and replace on every save; its directory must exist.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> RunRecord | None:
        """Return the stored record, or None when there is no file (a first start).

        Raises:
            StoreError: the file is unreadable, too large or not a valid record.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read master state {self.path}: {e}") from None
        if len(raw) > MAX_STORE_BYTES:
            raise StoreError(f"master state {self.path} is larger than {MAX_STORE_BYTES} bytes")
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            rec = RunRecord(
                id_floor=int(doc["id_floor"]),
                members=[int(x) for x in doc["members"]],
                epoch=int(doc.get("epoch", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(f"master state {self.path} is not valid: {e}") from None
        if rec.id_floor < 1 or any(p < 1 or p >= rec.id_floor for p in rec.members):
            raise StoreError(f"master state {self.path} is inconsistent: {rec}")
        return rec

    def save(self, rec: RunRecord) -> None:
        """Replace the file with ``rec`` atomically.

        Raises:
            OSError: the directory is not writable (the caller logs it; the master goes on).
        """
        doc = {
            "format": FORMAT,
            "id_floor": rec.id_floor,
            "members": sorted(rec.members),
            "epoch": rec.epoch,
        }
        write_atomic(self.path, json.dumps(doc, separators=(",", ":")).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old file or the new one, never a
    mix: write a temporary file beside it, fsync, rename over it.

    Raises:
        OSError: the directory is not writable (nothing is left behind).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
