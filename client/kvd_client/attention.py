"""Attention over disjoint key sets merges exactly by log-sum-exp.

For keys split into sets A and B with partial outputs o_A, o_B (softmax-weighted value means within each set)
and lse_A, lse_B (log of the sum of exp(scaled scores) within each set):
    o = (e^{lse_A} o_A + e^{lse_B} o_B) / (e^{lse_A} + e^{lse_B}),   lse = log(e^{lse_A} + e^{lse_B}).
An empty set has lse = -inf and contributes nothing.
"""

from __future__ import annotations

import torch


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions. out_*: [..., head_dim]; lse_*: [...]. Computed in float32 or wider;
    returns (out, lse) in the promoted dtype of the inputs."""
    lse = torch.logaddexp(lse_a, lse_b)
    # exp(-inf - -inf) would be NaN: where both sets are empty the weights are defined as 0.
    finite = torch.isfinite(lse)
    safe_lse = torch.where(finite, lse, torch.zeros_like(lse))
    weight_a = torch.where(finite, torch.exp(lse_a - safe_lse), torch.zeros_like(lse))
    weight_b = torch.where(finite, torch.exp(lse_b - safe_lse), torch.zeros_like(lse))
    out = weight_a.unsqueeze(-1) * out_a + weight_b.unsqueeze(-1) * out_b
    return out, lse


def partial_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                      valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its own key set, in float32.

    queries [H, d]; keys, values [H, k, d]; valid [H, k] bool (False entries are ignored).
    Returns output [H, d] and lse [H] (-inf and a zero output where a head has no valid key).
    """
    q = queries.float()
    scores = torch.bmm(keys.float(), q.unsqueeze(-1)).squeeze(-1) * scale
    return attention_from_scores(scores, values, valid)


def attention_from_scores(scores: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention given already-scaled float32 scores [H, k] of keys whose values are [H, k, d]."""
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    probs = torch.where(finite.unsqueeze(-1), probs, torch.zeros_like(probs))
    out = torch.bmm(probs.unsqueeze(1), values.float()).squeeze(1)
    return out, lse
