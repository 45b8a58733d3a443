"""kvd_transformers.retro_merge: the merge of a retro step's rows, eager (what the CPU runs) against a float64
union reference, and the CUDA kernel's own code run by triton's interpreter against the eager ops."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kvd_transformers.retro_merge import merge_rows_eager

ROOT = Path(__file__).resolve().parent.parent


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attention of q [D] over k, v [n, D] and its log-sum-exp (-inf, zeros where n = 0)."""
    if k.shape[0] == 0:
        return torch.zeros_like(q), torch.tensor(float("-inf"), dtype=torch.float64)
    scores = k @ q
    return torch.softmax(scores, 0) @ v, torch.logsumexp(scores, 0)


@pytest.mark.parametrize(("past", "keep"), [(0, 1), (1, 1), (3, 2), (3, 4)])
def test_eager_merge_is_attention_over_the_union(past: int, keep: int) -> None:
    """Each row: a base part (a cached row or the window part) and kvd's part over disjoint key sets (kvd's
    sometimes empty: -inf); the merged row equals attention over the union, the kept rows are the last ones."""
    gen = torch.Generator().manual_seed(past * 10 + keep)
    b, heads, d, rows = 2, 3, 8, past + 1
    base_out, base_lse = torch.empty(b, rows, heads, d), torch.empty(b, rows, heads, 1)
    reply_out, reply_lse = torch.empty(b, rows, heads, d), torch.empty(b, rows, heads, 1)
    union = torch.empty(b, rows, heads, d, dtype=torch.float64)
    union_lse = torch.empty(b, rows, heads, 1, dtype=torch.float64)
    for i in range(b):
        for r in range(rows):
            for h in range(heads):
                q = torch.randn(d, generator=gen, dtype=torch.float64)
                k = torch.randn(12, d, generator=gen, dtype=torch.float64)
                v = torch.randn(12, d, generator=gen, dtype=torch.float64)
                split = 4 + (i + r + h) % 5
                taken = 12 if (i + r + h) % 4 else split  # sometimes kvd found nothing new
                o, lse = partial_attention(q, k[:split], v[:split])
                base_out[i, r, h], base_lse[i, r, h] = o, lse
                o, lse = partial_attention(q, k[split:taken], v[split:taken])
                reply_out[i, r, h], reply_lse[i, r, h] = o, lse
                o, lse = partial_attention(q, k[:taken], v[:taken])
                union[i, r, h], union_lse[i, r, h] = o, lse
    assert torch.isinf(reply_lse).any()
    cached = None if past == 0 else (base_out[:, :past], base_lse[:, :past])
    window = (base_out[:, past:], base_lse[:, past:])
    keep = min(keep, rows)
    out, kept, kept_lse = merge_rows_eager(cached, window, (reply_out, reply_lse), keep, torch.float32)
    assert out.shape == (b, rows, heads, d) and kept.shape == (b, keep, heads, d)
    assert torch.allclose(out.double(), union, atol=1e-5)
    assert torch.equal(kept, out[:, rows - keep:]) and torch.allclose(kept_lse.double(), union_lse[:, rows - keep:],
                                                                      atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_cuda_kernel_matches_the_eager_ops_in_triton_interpreter() -> None:
    """The kernel's own code (run on the CPU by TRITON_INTERPRET=1, which must be set before triton.jit runs:
    a subprocess) against merge_rows_eager: strided cached rows, a bf16 window part, -inf rows, P = 0 .. 3."""
    script = textwrap.dedent("""
        import torch
        from kvd_transformers import retro_merge as rm
        torch.manual_seed(0)
        for past in (0, 1, 3):
            for keep in range(1, past + 2):
                b, h, d = 2, 4, 24
                cached = None if past == 0 else (torch.randn(b, past + 1, h, d)[:, 1:],
                                                 torch.randn(b, past + 1, h, 1)[:, 1:])
                window = (torch.randn(b, 1, h, d).bfloat16(), torch.randn(b, 1, h, 1))
                buf = torch.randn(b, past + 1, h, d + 1)
                buf[0, -1, 2, :] = 0
                buf[0, -1, 2, d] = float("-inf")
                reply = (buf[..., :d], buf[..., d:])
                for dtype in (torch.bfloat16, torch.float32):
                    got = rm._merge_rows_kernel(cached, window, reply, keep, dtype)
                    ref = rm.merge_rows_eager(cached, window, reply, keep, dtype)
                    assert got[0].dtype == dtype and got[0].shape == ref[0].shape, (got[0].shape, ref[0].shape)
                    tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
                    assert torch.allclose(got[0].float(), ref[0].float(), atol=tol), (past, keep, dtype)
                    assert torch.allclose(got[1], ref[1], atol=1e-6) and torch.allclose(got[2], ref[2], atol=1e-6)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "integrations" / "transformers"), str(ROOT / "client"),
                                          str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
