"""Relative RMS reconstruction error of block codes on pseudo-gradient-like data (the figures
that chose INT4 = uniform min-max over FP4 E3M0, and PACKED_BLOCK = 128).

Run: .venv/bin/python docs/bench/2026-12-04/int4/codec_error.py > codec_error.json
Uniform min-max is pccl's rule (float64 here; the float32 kernels agree to ~1e-7). E3M0 is a
sign plus a 3-bit exponent, magnitudes {0, 2^-6 .. 2^0} x the block's absmax (one fp32 scale),
nearest value. bits/element counts the fp32 meta: 64 bits per block for min-max, 32 for E3M0.
"""

import json
import os
import platform

import numpy as np

rng = np.random.default_rng(0)
n = 1 << 20
data = {
    "gaussian": rng.standard_normal(n).astype(np.float32),
    "student_t3": rng.standard_t(3, n).astype(np.float32),
    "laplace": rng.laplace(size=n).astype(np.float32),
}


def minmax(x, bits, block):
    levels = 2**bits - 1
    r = x.reshape(-1, block).astype(np.float64)
    mn, mx = r.min(1, keepdims=True), r.max(1, keepdims=True)
    s = (mx - mn) / levels
    return (mn + np.rint(np.minimum((r - mn) / s, levels)) * s).reshape(-1)


def e3m0(x, block):
    r = x.reshape(-1, block).astype(np.float64)
    a = np.abs(r).max(1, keepdims=True)
    grid = np.concatenate([[0.0], 2.0 ** np.arange(-6, 1)])
    idx = np.abs((np.abs(r) / a)[..., None] - grid).argmin(-1)
    return (np.sign(r) * grid[idx] * a).reshape(-1)


def rel(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


rows = []
for name, x in data.items():
    for block in (32, 64, 128, 256, 512, 1024, 4096):
        for bits in (8, 4, 2):
            rows.append(dict(data=name, code=f"minmax{bits}", block=block,
                             bits_per_element=bits + 64 / block,
                             rel_rms=rel(x, minmax(x, bits, block))))
        rows.append(dict(data=name, code="e3m0", block=block, bits_per_element=4 + 32 / block,
                         rel_rms=rel(x, e3m0(x, block))))
with open("/proc/cpuinfo") as f:
    cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
machine = {"cpu_model": cpu or platform.processor(), "cores": os.cpu_count(),
           "numpy": np.__version__}
print(json.dumps({"elements": n, "rows": rows, "machine": machine}, indent=1))
