"""In-process model of streaming DiLoCo on the char-LM: exact fp32 mean, no codec, no network.

Run (JSON keys below; e.g. {"P": 4, "tau": 1, "merge": "eager"}):
    .venv/bin/python docs/bench/2026-12-04/streaming/simulate.py '{"P": 4, "tau": 1}'

Every peer is a model in this process training on its own shard exactly as the real workers do
(``pccl.tools.charlm``: same initialisation, shards, batches, AdamW); the pseudo-gradient mean is
exact, the outer step is Nesterov SGD. With ``P = 1, tau = 0`` and ``P = 4, tau = 0`` it gives the
real runs' held-out losses to 4 digits (quantization NONE), so it isolates what the schedule,
the overlap and the merge cost without the ring's codec or its noise. Keys (JSON): H, rounds, P,
tau, merge ("eager", "carry", "replace"), peers, seed, lr, mu, nest. Prints the final held-out
loss of the outer parameters (after ``rounds`` fragment rounds landed).
"""

import json
import sys

import torch

from pccl.tools import charlm as T


def _flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def _set(m: torch.nn.Module, v: torch.Tensor) -> None:
    o = 0
    for p in m.parameters():
        n = p.numel()
        p.data.copy_(v[o : o + n].view_as(p))
        o += n


def run(H=8, rounds=30, P=1, tau=0, merge="eager", peers=3, seed=0, lr=0.7, mu=0.9, nest=True):
    cfg = T.TaskConfig(seed=seed)
    models = [T.build(cfg) for _ in range(peers)]
    opts = [T.inner_optimizer(cfg, m) for m in models]
    shards = [T.make_shard(cfg, i) for i in range(peers)]
    theta = _flat(models[0]).clone()
    mom = torch.zeros_like(theta)
    edges = [round(theta.numel() * i / P) for i in range(P + 1)]
    period, inflight, k = H // P, None, 0

    def outer_step(a, b, g):
        mom[a:b] = mu * mom[a:b] + g
        theta[a:b] -= lr * ((g + mu * mom[a:b]) if nest else mom[a:b])

    for step in range(rounds * H + tau):
        for i, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad(set_to_none=True)
            T.loss_fn(m, *T.batch(cfg, shards[i], i, step)).backward()
            o.step()
        s = step + 1
        if inflight is not None and s % period == tau:  # the exchange lands
            a, b, g, starts = inflight
            inflight = None
            outer_step(a, b, g)
            for m, st in zip(models, starts):
                v = _flat(m)
                keep = (v[a:b] - st) if merge in ("eager", "carry") else 0
                v[a:b] = theta[a:b] + keep
                _set(m, v)
        if s % period == 0 and s <= rounds * H:  # a fragment boundary
            f = k % P
            k += 1
            a, b = edges[f], edges[f + 1]
            starts = [_flat(m)[a:b].clone() for m in models]
            g = sum(theta[a:b] - v for v in starts) / peers
            if tau == 0:
                outer_step(a, b, g)
                for m in models:
                    v = _flat(m)
                    v[a:b] = theta[a:b]
                    _set(m, v)
                continue
            if merge == "eager":  # own estimate of the outer step, outer state untouched
                for j, (m, v0) in enumerate(zip(models, starts)):
                    gi = theta[a:b] - v0
                    mi = mu * mom[a:b] + gi
                    starts[j] = theta[a:b] - lr * ((gi + mu * mi) if nest else mi)
                    v = _flat(m)
                    v[a:b] = starts[j]
                    _set(m, v)
            inflight = (a, b, g, starts)
    ev = T.build(cfg)
    _set(ev, theta)
    return T.evaluate(ev, T.make_eval(cfg))


if __name__ == "__main__":
    torch.set_num_threads(1)
    kw = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    print(json.dumps({**kw, "loss": run(**kw)}), flush=True)
