"""Shared-token authentication: HMAC-SHA256 challenge-response, the token never on the wire.

Every listener (master, peer p2p) opens a connection by sending a fresh 32-byte nonce
(``*_CHALLENGE``). The dialler proves it knows the token by returning
``HMAC(token, purpose || nonce || context)``; a recorded answer is useless against the next nonce,
so replayed handshakes fail. The master also proves itself to the peer in its welcome
(mutual authentication). Without a token configured, proofs are empty and not checked.
Pure functions; any thread.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

__all__ = ["NONCE_LEN", "load_token", "new_nonce", "prove", "verify"]

NONCE_LEN = 32
MIN_TOKEN_LEN = 16


def new_nonce() -> bytes:
    return os.urandom(NONCE_LEN)


def prove(token: bytes | None, purpose: bytes, *parts: bytes | int) -> bytes:
    """``HMAC-SHA256(token, purpose || parts...)``; empty when no token is configured."""
    if not token:
        return b""
    mac = hmac.new(token, purpose, hashlib.sha256)
    for p in parts:
        mac.update(p.to_bytes(8, "big") if isinstance(p, int) else p)
    return mac.digest()


def verify(token: bytes | None, proof: bytes, purpose: bytes, *parts: bytes | int) -> bool:
    """True when no token is configured, or ``proof`` is the right HMAC (constant time)."""
    if not token:
        return True
    return hmac.compare_digest(proof, prove(token, purpose, *parts))


def load_token(path: str | os.PathLike[str]) -> bytes:
    """Read a token file (surrounding whitespace stripped).

    Raises:
        ValueError: the token is shorter than 16 bytes.
        OSError: the file cannot be read.
    """
    token = Path(path).read_bytes().strip()
    if len(token) < MIN_TOKEN_LEN:
        raise ValueError(f"token in {path} is shorter than {MIN_TOKEN_LEN} bytes")
    return token


def check_token(token: bytes | str | None) -> bytes | None:
    """Normalise a token argument; ``None`` disables authentication."""
    if token is None:
        return None
    if isinstance(token, str):
        token = token.encode()
    if not isinstance(token, bytes):
        raise TypeError("auth token must be bytes or str")
    if len(token) < MIN_TOKEN_LEN:
        raise ValueError(f"auth token must be at least {MIN_TOKEN_LEN} bytes")
    return token
