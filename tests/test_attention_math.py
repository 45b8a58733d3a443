"""Partial attention and the log-sum-exp merge against full attention computed independently."""

from __future__ import annotations

import math

import numpy as np
import torch
from kvd_client.attention import merge_attention, partial_attention

from tests.reference import full_attention


def _data(seed: int, heads: int = 4, kv_heads: int = 2, n: int = 300, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(heads, d, generator=g), torch.randn(kv_heads, n, d, generator=g) * 2,
            torch.randn(kv_heads, n, d, generator=g))


def _attend(q, keys, values, positions, scale):
    group = q.shape[0] // keys.shape[0]
    ids = torch.tensor(positions).expand(q.shape[0], -1)
    heads = (torch.arange(q.shape[0]) // group).unsqueeze(1)
    return partial_attention(q, keys[heads, ids], values[heads, ids], scale)


def test_partial_attention_matches_reference():
    q, keys, values = _data(0)
    scale = 1 / math.sqrt(q.shape[1])
    positions = list(range(0, 300, 3))
    out, lse = _attend(q, keys, values, positions, scale)
    ref_out, ref_lse = full_attention(q, keys, values, scale, positions)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-5, atol=1e-5)


def test_window_plus_complement_merges_to_full_attention():
    """GPU-side window (sink + recent) merged with attention over the complement equals full attention."""
    q, keys, values = _data(1)
    scale = 0.3
    n = keys.shape[1]
    window = list(range(4)) + list(range(n - 32, n))
    complement = [p for p in range(n) if p not in set(window)]
    o_w, lse_w = _attend(q, keys, values, window, scale)
    o_r, lse_r = _attend(q, keys, values, complement, scale)
    out, lse = merge_attention(o_w, lse_w, o_r, lse_r)
    ref_out, ref_lse = full_attention(q, keys, values, scale)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-5, atol=1e-5)


def test_merge_is_associative_over_many_parts():
    q, keys, values = _data(2)
    parts = [list(range(a, a + 50)) for a in range(0, 300, 50)]
    out, lse = _attend(q, keys, values, parts[0], 0.25)
    for part in parts[1:]:
        o, s = _attend(q, keys, values, part, 0.25)
        out, lse = merge_attention(out, lse, o, s)
    ref_out, _ = full_attention(q, keys, values, 0.25)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-5, atol=1e-5)


def test_empty_sets_merge_to_the_other_side_and_never_nan():
    q, keys, values = _data(3)
    o, s = _attend(q, keys, values, list(range(10)), 0.5)
    empty_o, empty_s = partial_attention(q, torch.empty(4, 0, 16), torch.empty(4, 0, 16), 0.5)
    assert torch.isneginf(empty_s).all() and (empty_o == 0).all()
    out, lse = merge_attention(o, s, empty_o, empty_s)
    torch.testing.assert_close(out, o)
    torch.testing.assert_close(lse, s)
    both_o, both_s = merge_attention(empty_o, empty_s, empty_o, empty_s)
    assert not torch.isnan(both_o).any() and torch.isneginf(both_s).all()


def test_masked_entries_are_ignored():
    q, keys, values = _data(4)
    group = 2
    ids = torch.arange(20).expand(4, -1)
    heads = (torch.arange(4) // group).unsqueeze(1)
    valid = torch.ones(4, 20, dtype=torch.bool)
    valid[:, 10:] = False
    out, lse = partial_attention(q, keys[heads, ids], values[heads, ids], 0.5, valid)
    ref_out, ref_lse = full_attention(q, keys, values, 0.5, list(range(10)))
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-5, atol=1e-5)
