"""A tiny character-level language model on a corpus generated here (no downloads).

Shared by the examples, ``pccl demo`` and the DiLoCo tests: the corpus generator, the model, the
batch sampler, the evaluation and an fp32 data-parallel (DDP) baseline, all deterministic for a
given seed so that a DiLoCo run and its baseline see exactly the same data.

The corpus comes from a small random grammar ("the old man carries a red ball near the river
today."), so a model of a few tens of thousands of parameters goes from ln(vocab) ~ 3.3 nats per
character to about 1 within a few hundred steps. Shard ``i`` is text generated with seed
``(seed, i)``: every peer sees different sentences from the same language.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "VOCAB",
    "CharMLP",
    "TaskConfig",
    "batch",
    "ddp_baseline",
    "ddp_bytes_per_step",
    "evaluate",
    "make_eval",
    "make_shard",
]

VOCAB = " .abcdefghijklmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(VOCAB)}

_SUBJECTS = [
    "the cat",
    "a dog",
    "my friend",
    "the old man",
    "a small bird",
    "the teacher",
    "her brother",
    "the robot",
    "our neighbour",
    "a tired farmer",
]
_VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "builds", "reads", "wants"]
_ADJ = ["red", "green", "big", "quiet", "long", "blue", "strange", "warm", "heavy"]
_NOUNS = ["ball", "box", "tree", "letter", "car", "book", "map", "house", "song", "river"]
_PLACES = [
    "in the park",
    "at home",
    "near the river",
    "on the hill",
    "by the sea",
    "under the bridge",
    "in the kitchen",
]
_TIMES = ["today", "at night", "every day", "in may", "after lunch", "again"]


@dataclass(frozen=True)
class TaskConfig:
    """Everything that defines a training run of the task (the same on every peer)."""

    seed: int = 0
    context: int = 8
    embed: int = 16
    hidden: int = 128
    batch: int = 32
    lr: float = 3e-3
    shard_chars: int = 60_000
    eval_windows: int = 2048


def _sentence(rng: np.random.Generator) -> str:
    words = [_SUBJECTS[rng.integers(len(_SUBJECTS))], _VERBS[rng.integers(len(_VERBS))]]
    det = ("a", "the", "one")[rng.integers(3)]
    if rng.random() < 0.6:
        words.append(f"{det} {_ADJ[rng.integers(len(_ADJ))]} {_NOUNS[rng.integers(len(_NOUNS))]}")
    else:
        words.append(f"{det} {_NOUNS[rng.integers(len(_NOUNS))]}")
    if rng.random() < 0.5:
        words.append(_PLACES[rng.integers(len(_PLACES))])
    if rng.random() < 0.3:
        words.append(_TIMES[rng.integers(len(_TIMES))])
    return " ".join(words) + ". "


def _text(seed: tuple[int, ...], chars: int) -> np.ndarray:
    rng = np.random.default_rng(list(seed))
    parts: list[str] = []
    n = 0
    while n < chars:
        s = _sentence(rng)
        parts.append(s)
        n += len(s)
    return np.array([_INDEX[c] for c in "".join(parts)[:chars]], dtype=np.int64)


def make_shard(cfg: TaskConfig, shard: int) -> torch.Tensor:
    """Token ids of training shard ``shard``."""
    return torch.from_numpy(_text((cfg.seed, 1, shard), cfg.shard_chars))


def make_eval(cfg: TaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed held-out set: ``(contexts [N, context], next-char targets [N])``."""
    ids = torch.from_numpy(_text((cfg.seed, 2), cfg.eval_windows + cfg.context + 1))
    idx = torch.arange(cfg.eval_windows)
    x = torch.stack([ids[i : i + cfg.context] for i in idx.tolist()])
    return x, ids[idx + cfg.context]


def batch(cfg: TaskConfig, ids: torch.Tensor, shard: int, step: int) -> tuple[torch.Tensor, ...]:
    """The minibatch shard ``shard`` trains on at global inner step ``step`` (deterministic)."""
    seed = np.random.SeedSequence([cfg.seed, shard, step]).generate_state(1)[0]
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - cfg.context - 1, (cfg.batch,), generator=g)
    offs = torch.arange(cfg.context)
    x = ids[starts[:, None] + offs[None, :]]
    return x, ids[starts + cfg.context]


class CharMLP(nn.Module):
    """Embedding of the last ``context`` characters -> MLP -> next-character logits."""

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), cfg.embed)
        self.fc1 = nn.Linear(cfg.context * cfg.embed, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, len(VOCAB))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(1)
        h = torch.tanh(self.fc1(h))
        h = torch.tanh(self.fc2(h)) + h
        return self.out(h)


def build(cfg: TaskConfig) -> CharMLP:
    """The model with the run's deterministic initialisation."""
    torch.manual_seed(cfg.seed)
    return CharMLP(cfg)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean cross-entropy (nats per character) on the held-out set."""
    return float(loss_fn(model, *data))


def inner_optimizer(cfg: TaskConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)


def ddp_baseline(cfg: TaskConfig, world: int, steps: int) -> list[float]:
    """fp32 data parallelism over ``world`` shards: every step averages the shards' gradients.

    Exactly what DDP computes (one process simulating the ranks). Returns the eval loss after
    every step.
    """
    model = build(cfg)
    opt = inner_optimizer(cfg, model)
    shards = [make_shard(cfg, i) for i in range(world)]
    data = make_eval(cfg)
    curve = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        for i in range(world):
            (loss_fn(model, *batch(cfg, shards[i], i, step)) / world).backward()
        opt.step()
        curve.append(evaluate(model, data))
    return curve


def num_params(cfg: TaskConfig) -> int:
    return sum(p.numel() for p in build(cfg).parameters())


def ddp_bytes_per_step(n_params: int, world: int) -> int:
    """Bytes one peer sends per step in an fp32 ring all-reduce of the gradients."""
    if world < 2:
        return 0
    return math.ceil(2 * (world - 1) / world * 4 * n_params)
