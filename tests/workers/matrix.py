"""Peer worker: a whole matrix of all-reduces (dtype x op x size x in-place x quantization).

Every peer builds the same case list and calls ``all_reduce`` in the same order. Inputs are
seeded by ``(seed, case, peer index)``, so every peer can rebuild every peer's input and the
float64 (or exact integer) reference. Per case it prints the digest of its result bytes, the
number of elements outside the error bound (see ``bound``), whether ``send`` is intact, and the
``ReduceInfo`` fields; the test compares these across peers.

params: ``world``, ``idx``, ``seed``, ``sizes``, ``streams``, ``config`` (Config keyword args).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from _common import digest, emit, join, params, run

import pccl

FLOAT_DTYPES = ["float32", "float64", "float16", "bfloat16", "torch_float32"]
INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8"]
DTYPES = FLOAT_DTYPES + INT_DTYPES
OPS = ["SUM", "AVG", "MIN", "MAX", "PROD"]
QUANTS = ["FP16", "BF16", "UINT8", "INT4", "INT2"]
#: Code levels of the block min-max encodings (uint8, packed 4-bit, packed 2-bit).
LEVELS = {"UINT8": 255, "INT4": 15, "INT2": 3}

# Machine epsilon of the storage type; a result is rounded at most once per ring hop.
EPS = {
    "float32": 2.0**-23,
    "torch_float32": 2.0**-23,
    "float64": 2.0**-52,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
}
# Smallest subnormal: absolute rounding error near zero.
TINY = {
    "float32": 2.0**-149,
    "torch_float32": 2.0**-149,
    "float64": 2.0**-1074,
    "float16": 2.0**-24,
    "bfloat16": 2.0**-133,
}
QEPS = {"FP16": 2.0**-10, "BF16": 2.0**-7}
QTINY = {"FP16": 2.0**-24, "BF16": 2.0**-133}


def build_cases(sizes: list[int]) -> list[dict[str, Any]]:
    cases = []
    for dtype in DTYPES:
        for op in OPS:
            for n in sizes:
                for inplace in (True, False):
                    cases.append(dict(dtype=dtype, op=op, n=n, inplace=inplace, quant="NONE"))
    for quant in QUANTS:
        for op in OPS:
            for n in sizes:
                for inplace in (True, False):
                    cases.append(dict(dtype="float32", op=op, n=n, inplace=inplace, quant=quant))
    for k, c in enumerate(cases):
        c["k"] = k
    return cases


def make_input(case: dict[str, Any], seed: int, i: int, world: int) -> np.ndarray:
    """Peer ``i``'s input, as a float64 (floats) or int64/uint64 (ints) array of exact values."""
    rng = np.random.default_rng([seed, case["k"], i])
    n, dtype, op = case["n"], case["dtype"], case["op"]
    if dtype in INT_DTYPES:
        info = np.iinfo(dtype)
        if op == "AVG":  # the exact sum fits, so truncation toward zero is what is measured
            lo, hi = info.min // world + 1, info.max // world
        else:  # full range: SUM and PROD wrap around
            lo, hi = info.min, info.max
        return rng.integers(lo, hi, size=n, endpoint=True, dtype=dtype)
    if op == "PROD":
        # |partial products| <= 1 for the block min-max encodings
        top = 1.0 if case["quant"] in LEVELS else 1.5
        mag = rng.uniform(0.5, top, size=n)
        return np.where(rng.random(n) < 0.5, -mag, mag)
    return rng.uniform(-1.0, 1.0, size=n)


def to_buffer(values: np.ndarray, dtype: str) -> Any:
    """The array handed to pccl (numpy, or a torch tensor for bfloat16 / torch_float32)."""
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    if dtype == "torch_float32":
        import torch

        return torch.from_numpy(values.astype(np.float32))
    return values.astype(dtype)


def as_exact(buf: Any, dtype: str) -> np.ndarray:
    """Values of a buffer, exactly, as float64 (floats) or the int dtype itself."""
    if dtype in ("bfloat16", "torch_float32"):
        import torch

        return buf.to(torch.float64).numpy()
    if dtype in INT_DTYPES:
        return np.asarray(buf).copy()
    return np.asarray(buf).astype(np.float64)


def empty_like(buf: Any) -> Any:
    if isinstance(buf, np.ndarray):
        return np.full_like(buf, 0)
    import torch

    return torch.zeros_like(buf)


def int_reference(xs: list[np.ndarray], op: str, dtype: str, world: int) -> np.ndarray:
    wide = np.uint64 if dtype == "uint8" else np.int64
    st = np.stack([x.astype(wide) for x in xs])
    if op == "SUM":  # two's-complement wrap-around: the sum mod 2**bits
        return st.sum(axis=0, dtype=wide).astype(dtype)
    if op == "PROD":
        return st.prod(axis=0, dtype=wide).astype(dtype)
    if op == "MIN":
        return st.min(axis=0).astype(dtype)
    if op == "MAX":
        return st.max(axis=0).astype(dtype)
    s = st.sum(axis=0, dtype=wide)  # AVG: exact sum (fits by construction), truncated toward 0
    if wide is np.uint64:
        return (s // np.uint64(world)).astype(dtype)
    q = np.abs(s) // world
    return np.where(s < 0, -q, q).astype(dtype)


def float_reference(xs: list[np.ndarray], op: str, world: int) -> np.ndarray:
    st = np.stack(xs)
    if op == "SUM":
        return st.sum(axis=0)
    if op == "AVG":
        return st.sum(axis=0) / world
    if op == "MIN":
        return st.min(axis=0)
    if op == "MAX":
        return st.max(axis=0)
    return st.prod(axis=0)


def bound(xs: list[np.ndarray], ref: np.ndarray, case: dict[str, Any], world: int) -> np.ndarray:
    """Per-element error bound of a float result against the float64 reference.

    NONE: the ring rounds a partial result to the storage type at most once per hop (W-1
    reduce-scatter hops), each partial |p| <= S = sum_i |x_i|, so |err| <= (W-1) u S with
    u = eps/2; we allow W eps S (2x slack). AVG adds one division (<= 2 eps |ref|); PROD
    compounds relative error (<= 2 W eps prod|x_i|); MIN/MAX select and must be exact.

    FP16/BF16 wire: W encodings (W-1 hops plus the owner's final one), each off by at most
    u_q |value|; the same shapes as above with eps_q, plus float32 accumulation.

    UINT8 wire: block-wise min-max with round-to-nearest is off by at most half a step,
    (max - min) / 255 / 2, where max - min is the range of the encoded values in that block.
    Partial sums of a subset of peers range over at most R = sum_i (max x_i - min x_i), so W
    encodings add at most W R / 510; we allow W R / 255 (2x slack for the compounding of
    earlier errors into later ranges and float32 rounding). MIN/MAX: partials lie within the
    global [min, max], G = max - min, errors add (min/max are 1-Lipschitz): W G / 255. PROD:
    inputs |x| <= 1, so partials lie in [-1, 1] (range 2) and later factors do not amplify
    errors: W * 2 / 255.

    INT4 / INT2 wire: the same min-max encoding with L = 15 / 3 levels instead of 255, so every
    255 above becomes L. The 2x slack still covers the compounding: with L = 3 and W = 4 the
    ranges grown by earlier errors give at most about 1.1 R in total, under W R / L = 1.33 R.
    """
    op, quant = case["op"], case["quant"]
    W = world
    absx = np.abs(np.stack(xs))
    S = absx.sum(axis=0)
    P = absx.prod(axis=0)
    M = absx.max(axis=0)
    e32 = 2.0**-23
    if quant == "NONE":
        eps, tiny = EPS[case["dtype"]], TINY[case["dtype"]]
        if op == "SUM":
            return W * eps * S + W * tiny
        if op == "AVG":
            return eps * S + 2 * eps * np.abs(ref) + W * tiny
        if op == "PROD":
            return 2 * W * eps * P + W * tiny
        return np.zeros_like(ref)
    if quant in QEPS:
        eq, tq = QEPS[quant], QTINY[quant]
        if op == "SUM":
            return W * (eq + e32) * S + W * tq
        if op == "AVG":
            return (eq + e32) * S + 2 * e32 * np.abs(ref) + W * tq
        if op == "PROD":
            return 2 * W * (eq + e32) * P + W * tq
        return W * eq * M + W * tq
    L = LEVELS[quant]
    if op in ("SUM", "AVG"):
        R = float(sum(float(x.max() - x.min()) for x in xs)) if ref.size else 0.0
        b = W * R / L + W * e32 * S
        return b / W + 2 * e32 * np.abs(ref) if op == "AVG" else b
    if op in ("MIN", "MAX"):
        G = float(max(x.max() for x in xs) - min(x.min() for x in xs)) if ref.size else 0.0
        return W * G / L + W * e32 * M
    return W * 2 / L + 2 * W * e32 * P


def check(case: dict[str, Any], got: np.ndarray, xs: list[np.ndarray], world: int) -> dict:
    dtype = case["dtype"]
    if dtype in INT_DTYPES:
        ref = int_reference(xs, case["op"], dtype, world)
        bad = np.flatnonzero(got != ref)
        worst = 0.0
    else:
        exact_xs = [as_exact(to_buffer(x, dtype), dtype) for x in xs]
        ref = float_reference(exact_xs, case["op"], world)
        b = bound(exact_xs, ref, case, world)
        err = np.abs(got - ref)
        bad = np.flatnonzero(~(err <= b))  # NaN counts as bad
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(b > 0, err / b, np.where(err > 0, np.inf, 0.0))
        worst = float(ratio.max()) if ratio.size else 0.0
    out: dict[str, Any] = {"violations": int(bad.size), "worst": worst}
    if bad.size:
        j = int(bad[0])
        out["first_bad"] = {"index": j, "got": got[j].item(), "ref": ref[j].item()}
    return out


def main() -> None:
    addr, p = params()
    world, idx, seed = p["world"], p["idx"], p["seed"]
    cases = build_cases(p["sizes"])
    comm = pccl.Communicator(addr, streams=p["streams"], config=pccl.Config(**p["config"]))
    join(comm, world)
    emit("joined", peer_id=comm.peer_id, world=comm.world_size, cases=len(cases))
    for case in cases:
        xs = [make_input(case, seed, i, world) for i in range(world)]
        send = to_buffer(xs[idx], case["dtype"])
        before = digest(send)
        recv = None if case["inplace"] else empty_like(send)
        info = comm.all_reduce(
            send,
            recv,
            op=pccl.ReduceOp[case["op"]],
            quantization=pccl.Quantization[case["quant"]],
        )
        result = send if recv is None else recv
        rec = {
            "hash": digest(result),
            "send_intact": True if recv is None else digest(send) == before,
            "world": info.world_size,
            "tx": info.tx_bytes,
            "rx": info.rx_bytes,
            "seconds_ok": math.isfinite(info.seconds) and info.seconds >= 0,
            **check(case, as_exact(result, case["dtype"]), xs, world),
        }
        emit("case", **case, **rec)
    comm.close()
    emit("result", peer_id=comm.peer_id, cases=len(cases))


if __name__ == "__main__":
    run(main)
