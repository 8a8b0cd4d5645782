"""One ring all-reduce: reduce-scatter then all-gather, pipelined and striped.

The buffer of N elements is cut into W near-equal chunks (the first N mod W get one more
element) and every chunk into sub-chunks of ``sub`` elements. Rank r sends chunk (r - s) at
reduce-scatter step s and receives chunk (r - s - 1); it therefore owns chunk (r + 1) at the end.
Each sub-chunk moves independently: as soon as one arrives it is reduced into the working buffer
and forwarded at the next step, so the whole ring is a pipeline at sub-chunk grain. Frames go
round-robin over all streams to the successor (striping); the frame header says where each
belongs, so arrival order across streams does not matter.

Bit parity: a chunk's final value is produced once, by its owner (AVG divided there), and
forwarded verbatim during the all-gather, so every peer ends with the owner's bytes. With
quantization the owner encodes its final sub-chunk once, replaces its own copy by the decoded
values, and forwards the encoded bytes; every peer decodes identical bytes identically.
Reduce-scatter hops re-encode their partial sum (UINT8, INT4, INT2: fresh per-block min/scale,
rounded). INT4/INT2 use blocks of ``kernels.PACKED_BLOCK`` elements whatever
``Config.quant_block`` says (it sizes UINT8 blocks), and a slot is meta then packed codes.

All buffers are allocated when the operation is created (from the communicator's pool); the
per-frame path allocates only the 40-byte header. Runs on the peer's event-loop thread; the
kernels it calls release the GIL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from pccl import kernels as K
from pccl.errors import ProtocolError
from pccl.frame import DataHeader, encode_data_header
from pccl.types import DType, Quantization, ReduceOp

__all__ = ["BufferPool", "RingOp", "wire_len"]


#: Bits per code of the packed block codecs.
PACKED_BITS = {Quantization.INT4: 4, Quantization.INT2: 2}


def block_of(quant: Quantization, block: int) -> int:
    """Quantisation block of ``quant``: ``block`` (Config.quant_block) for UINT8, the fixed
    ``kernels.PACKED_BLOCK`` for INT4/INT2 (every peer computes the same wire sizes)."""
    return K.PACKED_BLOCK if quant in PACKED_BITS else block


def wire_len(n: int, itemsize: int, quant: Quantization, block: int) -> int:
    """Payload bytes of a sub-chunk of ``n`` elements (``block``: Config.quant_block)."""
    if quant == Quantization.NONE:
        return n * itemsize
    if quant == Quantization.UINT8:
        return n + 8 * K.num_blocks(n, block)
    bits = PACKED_BITS.get(quant)
    if bits is not None:
        return K.packed_len(n, bits) + 8 * K.num_blocks(n, K.PACKED_BLOCK)
    return 2 * n


class BufferPool:
    """Reusable scratch buffers: fresh pages cost more than the reduction itself."""

    def __init__(self, keep: int = 8, per_size: int = 4) -> None:
        self._free: dict[int, list[np.ndarray]] = {}
        self._keep = keep
        self._per_size = per_size  # a quantized operation takes three buffers of one size

    def get(self, nbytes: int) -> np.ndarray:
        lst = self._free.get(nbytes)
        if lst:
            return lst.pop()
        return np.empty(max(nbytes, 1), dtype=np.uint8)[:nbytes]

    def put(self, buf: np.ndarray) -> None:
        n = buf.nbytes
        lst = self._free.setdefault(n, [])
        if len(lst) < self._per_size and sum(len(v) for v in self._free.values()) < self._keep:
            lst.append(buf)


class RingOp:
    """State of one all-reduce on one peer; see the module docstring.

    Args:
        op_id, tag: identity on the wire.
        rank, world: position in the group ring and its size.
        src: flat storage view (numpy, storage dtype) of the input; never written unless it is
            ``work`` (in place).
        work: flat storage view receiving the result (may be ``src``).
        dtype, op, quant: what to compute and how to encode it.
        sub: sub-chunk size in elements.
        block: uint8 quantization block (Config.quant_block); INT4/INT2 use their own.
        send_frame: ``send_frame(header, payload)`` puts a frame on the next stream.
        pool: scratch buffers.
    """

    def __init__(
        self,
        *,
        op_id: int,
        tag: int,
        rank: int,
        world: int,
        src: np.ndarray,
        work: np.ndarray,
        dtype: DType,
        op: ReduceOp,
        quant: Quantization,
        sub: int,
        block: int,
        send_frame: Callable[[bytes, memoryview], None],
        pool: BufferPool,
    ) -> None:
        self.op_id, self.tag, self.rank, self.world = op_id, tag, rank, world
        self.src = src
        self.work = work
        # Out of place, reduce-scatter data lands straight in ``work`` and is combined with
        # ``src`` there (the ops are commutative, so the bits equal ``src op recv``): no copy
        # of the input and no scratch. In place, ``src`` must survive, so data lands in scratch.
        self.separate = src is not work and not np.shares_memory(src, work)
        self.wbytes = work.view(np.uint8)
        self.sbytes = src.view(np.uint8)
        self.dtype, self.op, self.quant = dtype, op, quant
        self.wire_block = block  # what wire_len takes
        self.block = block = block_of(quant, block)
        self.bits = PACKED_BITS.get(quant, 0)
        self.kop = ReduceOp.SUM if op == ReduceOp.AVG else op
        self.send_frame = send_frame
        self.pool = pool
        self.finished = False
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_progress = time.monotonic()
        self.tx_bytes = 0
        self.rx_bytes = 0
        n = work.size
        self.n = n
        W = world
        if quant == Quantization.UINT8 or self.bits:
            sub = max(block, sub // block * block)
        self.sub = max(1, sub)
        base, rem = divmod(n, W)
        self.start = [c * base + min(c, rem) for c in range(W + 1)]
        self.nsub = [-(-(self.start[c + 1] - self.start[c]) // self.sub) for c in range(W)]
        self.sub_base = [0]
        for c in range(W):
            self.sub_base.append(self.sub_base[-1] + self.nsub[c])
        total_subs = self.sub_base[-1]
        self.rs_got = bytearray(total_subs)
        self.ag_got = bytearray(total_subs)
        r = rank
        self.rs_left = sum(self.nsub[(r - s - 1) % W] for s in range(W - 1))
        self.ag_left = sum(self.nsub[(r - a) % W] for a in range(W - 1))
        itemsize = dtype.itemsize
        self._bufs: list[np.ndarray] = []
        if quant == Quantization.NONE:
            if not self.separate:
                self.scratch = self._alloc(n * itemsize).view(dtype.storage)
            self.wire_off: list[int] = []
        else:
            # Wire layout: sub-chunks back to back in global order, one offset table.
            offs = [0]
            for c in range(W):
                for k in range(self.nsub[c]):
                    offs.append(offs[-1] + wire_len(self._sublen(c, k), 4, quant, self.wire_block))
            self.wire_off = offs
            total = offs[-1]
            self.rs_send = self._alloc(total)
            self.rs_recv = self._alloc(total)
            self.ag_wire = self._alloc(total)
            if self.kop != ReduceOp.SUM and not self.separate:
                self.scratch = self._alloc(n * 4).view(np.float32)

    # ------------------------------------------------------------ layout helpers

    def _alloc(self, nbytes: int) -> np.ndarray:
        b = self.pool.get(nbytes)
        self._bufs.append(b)
        return b

    def release(self) -> None:
        """Return scratch to the pool (call once the verdict is known)."""
        for b in self._bufs:
            self.pool.put(b)
        self._bufs = []

    def _sublen(self, c: int, k: int) -> int:
        lo = self.start[c] + k * self.sub
        return min(self.sub, self.start[c + 1] - lo)

    def _slot(self, buf: np.ndarray, c: int, k: int) -> np.ndarray:
        g = self.sub_base[c] + k
        return buf[self.wire_off[g] : self.wire_off[g + 1]]

    def _split(self, slot: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(meta float32, q uint8) views of a UINT8, INT4 or INT2 wire slot."""
        nb = K.num_blocks(n, self.block)
        return slot[: 8 * nb].view(np.float32), slot[8 * nb :]

    # ------------------------------------------------------------ encode / decode

    def _encode(self, e0: int, n: int, slot: np.ndarray, own: bool = False) -> None:
        src = (self.src if own else self.work)[e0 : e0 + n]
        if self.quant == Quantization.UINT8:
            meta, q = self._split(slot, n)
            K.quantize_u8(src, q, meta, self.block)
        elif self.bits:
            meta, q = self._split(slot, n)
            K.quantize_packed(src, q, meta, self.bits, self.block)
        elif self.quant == Quantization.FP16:
            K.encode_f16(src, slot.view(np.uint16))
        else:
            K.encode_bf16(src, slot.view(np.uint16))

    def _decode(self, slot: np.ndarray, out: np.ndarray) -> None:
        n = out.size
        if self.quant == Quantization.UINT8:
            meta, q = self._split(slot, n)
            K.dequantize_u8(q, meta, out, self.block)
        elif self.bits:
            meta, q = self._split(slot, n)
            K.dequantize_packed(q, meta, out, self.bits, self.block)
        elif self.quant == Quantization.FP16:
            K.decode_f16(slot.view(np.uint16), out)
        else:
            K.decode_bf16(slot.view(np.uint16), out)

    def _accumulate(self, slot: np.ndarray, e0: int, n: int) -> None:
        acc = self.work[e0 : e0 + n]
        if self.separate and self.kop == ReduceOp.SUM:  # one pass: acc = src + decoded
            base = self.src[e0 : e0 + n]
            if self.quant == Quantization.UINT8:
                meta, q = self._split(slot, n)
                K.dequantize_add_u8(q, meta, base, acc, self.block)
            elif self.bits:
                meta, q = self._split(slot, n)
                K.dequantize_add_packed(q, meta, base, acc, self.bits, self.block)
            elif self.quant == Quantization.FP16:
                K.add_f16(slot.view(np.uint16), base, acc)
            else:
                K.add_bf16(slot.view(np.uint16), base, acc)
        elif self.separate:  # decode the partial into place, then combine with our input
            self._decode(slot, acc)
            K.reduce_inplace(acc, self.src[e0 : e0 + n], DType.FLOAT32, self.kop)
        elif self.kop != ReduceOp.SUM:
            tmp = self.scratch[e0 : e0 + n]
            self._decode(slot, tmp)
            K.reduce_inplace(acc, tmp, DType.FLOAT32, self.kop)
        elif self.quant == Quantization.UINT8:
            meta, q = self._split(slot, n)
            K.dequantize_accumulate_u8(q, meta, acc, self.block)
        elif self.bits:
            meta, q = self._split(slot, n)
            K.dequantize_accumulate_packed(q, meta, acc, self.bits, self.block)
        elif self.quant == Quantization.FP16:
            K.accumulate_f16(slot.view(np.uint16), acc)
        else:
            K.accumulate_bf16(slot.view(np.uint16), acc)

    # ------------------------------------------------------------ sending

    def _send(self, step: int, c: int, k: int, payload: np.ndarray) -> None:
        off = k * self.sub
        n = self._sublen(c, k)
        hdr = encode_data_header(self.op_id, self.tag, step, c, off, n, payload.nbytes)
        self.tx_bytes += payload.nbytes
        self.send_frame(hdr, payload.data.cast("B"))

    def _work_bytes(self, e0: int, n: int) -> np.ndarray:
        isz = self.dtype.itemsize
        return self.wbytes[e0 * isz : (e0 + n) * isz]

    def _send_partial(self, step: int, c: int, k: int) -> None:
        """Send a reduce-scatter sub-chunk: our own input at step 0, the partial sum after."""
        e0, n = self.start[c] + k * self.sub, self._sublen(c, k)
        own = step == 0
        if self.quant == Quantization.NONE:
            isz = self.dtype.itemsize
            buf = self.sbytes if own else self.wbytes
            self._send(step, c, k, buf[e0 * isz : (e0 + n) * isz])
        else:
            slot = self._slot(self.rs_send, c, k)
            self._encode(e0, n, slot, own)
            self._send(step, c, k, slot)

    def begin(self) -> None:
        """Send our own chunk (reduce-scatter step 0). Completes at once when W chunks are empty."""
        c = self.rank
        assert self.world >= 2, "callers raise TooFewPeers first"
        for k in range(self.nsub[c]):
            self._send_partial(0, c, k)
        self._check_done()

    # ------------------------------------------------------------ receiving

    def recv_target(self, h: DataHeader) -> memoryview:
        """Validate a frame header and return the memory its payload goes to.

        Raises:
            ProtocolError: the frame does not belong to this operation's schedule.
        """
        W, r = self.world, self.rank
        s = h.step
        if h.tag != self.tag:
            raise ProtocolError(f"frame for tag {h.tag} in operation of tag {self.tag}")
        if s < W - 1:
            want = (r - s - 1) % W
            got = self.rs_got
        elif s < 2 * W - 2:
            want = (r - (s - W + 1)) % W
            got = self.ag_got
        else:
            raise ProtocolError(f"ring step {s} out of range for world {W}")
        c = h.chunk
        if c != want:
            raise ProtocolError(f"chunk {c} at step {s}, expected {want}")
        k, rem = divmod(h.offset, self.sub)
        if rem or k >= self.nsub[c] or h.count != self._sublen(c, k):
            raise ProtocolError(f"bad sub-chunk offset {h.offset} count {h.count} of chunk {c}")
        g = self.sub_base[c] + k
        if got[g]:
            raise ProtocolError(f"duplicate sub-chunk {k} of chunk {c} at step {s}")
        isz = self.dtype.itemsize
        if h.payload != wire_len(h.count, isz, self.quant, self.wire_block):
            raise ProtocolError(f"payload of {h.payload} bytes for {h.count} elements")
        e0 = self.start[c] + h.offset
        if self.quant == Quantization.NONE:
            if s < W - 1 and not self.separate:
                buf = self.scratch.view(np.uint8)[e0 * isz : (e0 + h.count) * isz]
            else:
                buf = self._work_bytes(e0, h.count)
        else:
            buf = self._slot(self.rs_recv if s < W - 1 else self.ag_wire, c, k)
        return buf.data.cast("B")

    def reads_in_place(self, h: DataHeader) -> bool:
        """Whether :meth:`on_frame` can take this (validated) frame's payload from where it
        already is (``payload=``) instead of from :meth:`recv_target`'s memory: a frame whose
        bytes are read once and not forwarded as they are — an unquantized float32/float64 SUM
        reduce-scatter hop (summed straight from it), any quantized reduce-scatter hop (decoded
        and re-encoded from it) and a quantized all-gather frame of the last step (decoded from
        it; earlier steps forward the bytes, so they are kept)."""
        s, W = h.step, self.world
        if self.quant != Quantization.NONE:
            return s < W - 1 or s == 2 * W - 3
        return (
            s < W - 1 and self.kop == ReduceOp.SUM and self.dtype in (DType.FLOAT32, DType.FLOAT64)
        )

    def on_frame(self, h: DataHeader, payload: np.ndarray | None = None) -> None:
        """A frame's payload has fully arrived at the memory :meth:`recv_target` named, or
        (only where :meth:`reads_in_place`) is readable as ``payload`` (bytes) elsewhere, e.g.
        in a shared-memory ring: then it is used from there, without a copy (the bits equal
        the copy-then-use path's; IEEE addition is commutative)."""
        W = self.world
        s, c = h.step, h.chunk
        k = h.offset // self.sub
        n = h.count
        e0 = self.start[c] + h.offset
        g = self.sub_base[c] + k
        self.rx_bytes += h.payload
        self.last_progress = time.monotonic()
        try:
            if s < W - 1:
                self.rs_got[g] = 1
                self.rs_left -= 1
                last = s == W - 2
                if (
                    (self.quant == Quantization.UINT8 or self.bits)
                    and self.kop == ReduceOp.SUM
                    and not (last and self.op == ReduceOp.AVG)
                ):
                    self._hop_u8(s, c, k, e0, n, last, self._rs_frame(c, k, payload))
                else:
                    if self.quant != Quantization.NONE:
                        self._accumulate(self._rs_frame(c, k, payload), e0, n)
                    elif payload is not None:
                        acc = self.work[e0 : e0 + n]
                        base = self.src[e0 : e0 + n] if self.separate else acc
                        np.add(base, payload.view(self.dtype.storage), out=acc)
                    else:
                        other = self.src if self.separate else self.scratch
                        K.reduce_inplace(
                            self.work[e0 : e0 + n], other[e0 : e0 + n], self.dtype, self.kop
                        )
                    if s < W - 2:
                        self._send_partial(s + 1, c, k)
                    else:
                        self._own(c, k, e0, n)
            else:
                self.ag_got[g] = 1
                self.ag_left -= 1
                if self.quant == Quantization.NONE:
                    payload = self._work_bytes(e0, n)
                else:
                    if payload is None:
                        payload = self._slot(self.ag_wire, c, k)
                    self._decode(payload, self.work[e0 : e0 + n])
                if s < 2 * W - 3:
                    self._send(s + 1, c, k, payload)
        except (ValueError, TypeError) as e:  # a kernel refused: an internal invariant broke
            self.fail(f"kernel error: {e}")
            return
        self._check_done()

    def _rs_frame(self, c: int, k: int, payload: np.ndarray | None) -> np.ndarray:
        """A received quantized reduce-scatter frame: where it is read in place, else its
        ``rs_recv`` slot."""
        return self._slot(self.rs_recv, c, k) if payload is None else payload

    def _hop_u8(
        self, s: int, c: int, k: int, e0: int, n: int, last: bool, slot: np.ndarray
    ) -> None:
        """A uint8 (or packed INT4/INT2) SUM reduce-scatter hop in one fused pass: add the
        received partial (to our input, or in place), re-quantize it for the next hop, and on
        the last hop (we own the chunk) adopt the decoded values. ``slot`` holds the received
        frame (in ``rs_recv``, or where it is read in place). A forwarding hop's partial
        sum exists only in an L1 scratch block: ``work`` of that chunk is next written by the
        all-gather. The wire bytes equal the unfused path's."""
        meta, q = self._split(slot, n)
        out = self._slot(self.ag_wire if last else self.rs_send, c, k)
        meta_out, q_out = self._split(out, n)
        base = self.src[e0 : e0 + n] if self.separate else None
        keep = "adopt" if last else "discard"  # a forwarded partial is never read again
        acc = self.work[e0 : e0 + n]
        if self.bits:
            K.ring_hop_packed(q, meta, base, acc, q_out, meta_out, self.bits, self.block, keep)
        else:
            K.ring_hop_u8(q, meta, base, acc, q_out, meta_out, self.block, keep)
        self._send(self.world - 1 if last else s + 1, c, k, out)

    def _own(self, c: int, k: int, e0: int, n: int) -> None:
        """Finalise a sub-chunk of the chunk we own and start its all-gather."""
        W = self.world
        work = self.work[e0 : e0 + n]
        if self.op == ReduceOp.AVG:
            K.divide_inplace(work, self.dtype, W)
        if self.quant == Quantization.NONE:
            self._send(W - 1, c, k, self._work_bytes(e0, n))
        else:
            slot = self._slot(self.ag_wire, c, k)
            self._encode(e0, n, slot)
            self._decode(slot, work)  # adopt exactly what everyone else will decode
            self._send(W - 1, c, k, slot)

    def _check_done(self) -> None:
        if self.rs_left == 0 and self.ag_left == 0:
            self._complete()

    def _complete(self) -> None:
        if not self.finished:
            self.finished = True
            self.future.set_result(None)

    def close(self) -> None:
        """End the operation without a verdict (the caller has its own)."""
        if not self.finished:
            self.finished = True
            self.future.cancel()

    def fail(self, reason: str) -> None:
        """Stop the operation locally; its buffers receive nothing more."""
        if not self.finished:
            self.finished = True
            self.future.set_exception(ConnectionError(reason))
