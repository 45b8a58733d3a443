"""Independent references: brute-force top-k and full attention in float64/float32, written plainly."""

from __future__ import annotations

import numpy as np
import torch


def brute_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, begin: int = 0, end: int | None = None
               ) -> list[list[int]]:
    """queries [Hq, d]; keys [Hkv, n, d]. Per query head, positions of the k largest q.k in [begin, end),
    computed in float64 with numpy, ties broken by position."""
    q = queries.double().numpy()
    kk = keys.double().numpy()
    end = kk.shape[1] if end is None else end
    group = q.shape[0] // kk.shape[0]
    result = []
    for h in range(q.shape[0]):
        scores = kk[h // group, begin:end] @ q[h]
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        result.append([begin + i for i in order])
    return result


def full_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                   positions: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Attention of each query head over the given positions (all by default) in float64:
    returns output [Hq, d] and lse [Hq]."""
    q = queries.double().numpy()
    kk = keys.double().numpy()
    vv = values.double().numpy()
    group = q.shape[0] // kk.shape[0]
    positions = list(range(kk.shape[1])) if positions is None else positions
    outputs, lses = [], []
    for h in range(q.shape[0]):
        scores = kk[h // group, positions] @ q[h] * scale
        top = scores.max()
        weights = np.exp(scores - top)
        outputs.append(weights @ vv[h // group, positions] / weights.sum())
        lses.append(top + np.log(weights.sum()))
    return np.stack(outputs), np.array(lses)


def topk_ids(queries: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """queries [Hq, d], keys [Hkv, n, d] -> exact top-k ids [Hq, k] (GQA: head h uses KV head h // g)."""
    g = queries.shape[0] // keys.shape[0]
    return torch.stack([torch.topk(keys[h // g] @ queries[h], min(k, keys.shape[1])).indices
                        for h in range(queries.shape[0])])


def mean_recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Average over rows of |found & truth| / |truth|."""
    hits = [len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(found, truth, strict=True)]
    return float(np.mean(hits))
