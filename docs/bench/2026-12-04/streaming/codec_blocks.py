"""Relative RMS error of 4-bit and 2-bit block codes on real char-LM pseudo-gradients: the figures
that chose the INT4/INT2 wire block (issue 16: bytes >= 7.5 H fewer than fp32 DDP needs
<= ~4.2 bits per element with framing).

Run: .venv/bin/python docs/bench/2026-12-04/streaming/codec_blocks.py > codec_blocks.json

Pseudo-gradients: the model of pccl.tools.charlm trained by 3 shards for H = 8 AdamW steps from
a common start (``start - local``), at starts after 0, 64 and 192 steps of training; the flat
vector in model order, as DiLoCo hands it to the ring. Also their sum over the 3 shards (what a
reduce-scatter hop re-quantises). Codes:

* ``minmax{bits}-b{B}-f32``: pccl's rule (min, scale = range / levels, fp32 meta, 64 bits/block);
* ``minmax{bits}-b{B}-bf16``: the same with bf16 meta (32 bits/block): min rounded down to bf16,
  scale = (max - min_bf16) / levels rounded up to bf16, codes clamped to [0, levels];
* ``sym4-b{B}``: symmetric, q = rint(x / s) in [-7, 7], s = absmax / 7 (fp32, 32 bits/block);
* ``e3m0-b{B}``: sign + 3-bit exponent, magnitudes {0, 2^-6 .. 1} x absmax (fp32, 32 bits/block).
"""

import json

import numpy as np
import torch

from pccl.tools import charlm as T
from pccl.tools.machine import describe


def bf16_down(x):
    b = np.asarray(x, np.float32).view(np.uint32)
    t = (b & 0xFFFF0000).view(np.float32)  # truncation: toward zero
    neg_inexact = (t != x) & (x < 0)
    t = np.where(neg_inexact, (((b >> 16) + 1) << 16).astype(np.uint32).view(np.float32), t)
    return t.astype(np.float32)


def bf16_up(x):
    return -bf16_down(-np.asarray(x, np.float32))


def minmax(x, bits, block, meta):
    levels = 2**bits - 1
    r = x.reshape(-1, block)
    mn, mx = r.min(1, keepdims=True), r.max(1, keepdims=True)
    if meta == "bf16":
        mn = bf16_down(mn)
        s = bf16_up((mx - mn) / np.float32(levels))
    else:
        s = (mx - mn) / np.float32(levels)
    s = np.where(s == 0, np.float32(1), s)
    q = np.rint(np.clip((r - mn) / s, 0, levels))
    return (mn + q * s).reshape(-1)


def sym4(x, block):
    r = x.reshape(-1, block)
    s = np.abs(r).max(1, keepdims=True) / np.float32(7)
    s = np.where(s == 0, np.float32(1), s)
    return (np.rint(r / s) * s).reshape(-1)


def e3m0(x, block):
    r = x.reshape(-1, block).astype(np.float64)
    a = np.abs(r).max(1, keepdims=True)
    a = np.where(a == 0, 1, a)
    grid = np.concatenate([[0.0], 2.0 ** np.arange(-6, 1)])
    idx = np.abs((np.abs(r) / a)[..., None] - grid).argmin(-1)
    return (np.sign(r) * grid[idx] * a).reshape(-1)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def pseudo_grads(cfg, start_steps, h=8, peers=3):
    model = T.build(cfg)
    opt = T.inner_optimizer(cfg, model)
    shards = [T.make_shard(cfg, i) for i in range(peers)]
    out, done = [], 0
    for s in start_steps:
        for step in range(done, s):  # advance the common start on shard 0
            opt.zero_grad(set_to_none=True)
            T.loss_fn(model, *T.batch(cfg, shards[0], 0, step)).backward()
            opt.step()
        done = s
        start, state = flat(model), [p.detach().clone() for p in model.parameters()]
        ostate = opt.state_dict()
        pgs = []
        for i in range(peers):
            for p, v in zip(model.parameters(), state):
                p.data.copy_(v)
            opt.load_state_dict(ostate)
            for step in range(s, s + h):
                opt.zero_grad(set_to_none=True)
                T.loss_fn(model, *T.batch(cfg, shards[i], i, step)).backward()
                opt.step()
            pgs.append(start - flat(model))
        for p, v in zip(model.parameters(), state):
            p.data.copy_(v)
        opt.load_state_dict(ostate)
        out.append((s, pgs))
    return out


def rel(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def main():
    cfg = T.TaskConfig()
    codes = []
    for bits in (4, 2):
        for b in (128, 256, 512):
            codes.append(
                (
                    f"minmax{bits}-b{b}-f32",
                    bits + 64 / b,
                    lambda x, bits=bits, b=b: minmax(x, bits, b, "f32"),
                )
            )
            codes.append(
                (
                    f"minmax{bits}-b{b}-bf16",
                    bits + 32 / b,
                    lambda x, bits=bits, b=b: minmax(x, bits, b, "bf16"),
                )
            )
    for b in (128, 256):
        codes.append((f"sym4-b{b}", 4 + 32 / b, lambda x, b=b: sym4(x, b)))
        codes.append((f"e3m0-b{b}", 4 + 32 / b, lambda x, b=b: e3m0(x, b)))
    rows = []
    for s, pgs in pseudo_grads(cfg, (0, 64, 192)):
        for kind, vecs in (("peer", pgs), ("sum3", [pgs[0] + pgs[1] + pgs[2]])):
            for name, bpe, fn in codes:
                errs = []
                for v in vecs:
                    n = v.shape[0] - v.shape[0] % 512  # whole blocks of every size
                    errs.append(rel(v[:n], fn(v[:n])))
                rows.append(
                    dict(
                        start_step=s,
                        vector=kind,
                        code=name,
                        bits_per_element=bpe,
                        rel_rms=float(np.mean(errs)),
                    )
                )
    summary = {}
    for name, bpe, _ in codes:
        e = [r["rel_rms"] for r in rows if r["code"] == name]
        summary[name] = {"bits_per_element": bpe, "mean_rel_rms": float(np.mean(e))}
    print(
        json.dumps(
            {
                "elements": T.num_params(cfg),
                "summary": summary,
                "rows": rows,
                "machine": describe(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
