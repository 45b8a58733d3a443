"""RetroAttention's merge of a decode step's rows, as one op where it can be.

A retro step ends, per layer, with the same small arithmetic on P + 1 rows (the P cached outputs, then the new
token's device-window part) and kvd's answer for each: the exact log-sum-exp merge, the outputs in the model's
dtype for the next layer, and the float32 outputs and log-sum-exps of the rows that stay cached. In eager torch
that is eight ops (two cats, sub, sigmoid, lerp, logaddexp, the cast, the slices), and on a GPU host the model's
thread pays each op's launch and bookkeeping, ~5-20 us, on the decode's critical path. On CUDA with triton it is
one kernel (`_merge_kernel`); elsewhere the eager ops (`merge_rows_eager`, what the CPU tests check against
float64 references). `KVD_RETRO_MERGE=eager` forces the eager ops on CUDA too.
"""

from __future__ import annotations

import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager ops
    triton = None


def merge_rows(cached: tuple[torch.Tensor, torch.Tensor] | None, window: tuple[torch.Tensor, torch.Tensor],
               reply: tuple[torch.Tensor, torch.Tensor], keep: int, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cached: the layer's cached outputs float32 [B, P, Hq, D] and log-sum-exps [B, P, Hq, 1] (None: P = 0);
    window: the new token's device-window part, out [B, 1, Hq, D] and lse float32 [B, 1, Hq, 1]
    (ops.window_attention(rows=True)); reply: kvd's answer for all rows, out float32 [B, P + 1, Hq, D] and lse
    [B, P + 1, Hq, 1] (-inf: nothing new). Returns the merged outputs of all rows in `dtype` [B, P + 1, Hq, D],
    and the float32 outputs [B, keep, Hq, D] and log-sum-exps [B, keep, Hq, 1] of the last `keep` rows."""
    if reply[0].is_cuda and _kernel_usable():
        try:
            return _merge_rows_kernel(cached, window, reply, keep, dtype)
        except Exception as exc:  # a triton that cannot build the kernel: the eager ops from now on
            _KERNEL["failed"] = repr(exc)
            warnings.warn(f"kvd's RetroAttention merge kernel is off (eager ops instead): {exc!r}", RuntimeWarning,
                          stacklevel=2)
    return merge_rows_eager(cached, window, reply, keep, dtype)


_KERNEL: dict[str, str] = {}  # "failed": why the kernel could not run


def _kernel_usable() -> bool:
    return triton is not None and not _KERNEL and os.environ.get("KVD_RETRO_MERGE", "") != "eager"


def merge_rows_eager(cached: tuple[torch.Tensor, torch.Tensor] | None, window: tuple[torch.Tensor, torch.Tensor],
                     reply: tuple[torch.Tensor, torch.Tensor], keep: int, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """merge_rows in torch ops: o = lerp(o_base, o_r, sigmoid(lse_r - lse_base)), lse = logaddexp(lse_base,
    lse_r), where the base rows are the cached ones and then the window part (never empty: each row's window holds
    at least its own token)."""
    base_out, base_lse = base_rows(cached, window)
    out_r, lse_r = reply
    out = torch.lerp(base_out, out_r, torch.sigmoid(lse_r - base_lse))
    lse = torch.logaddexp(base_lse, lse_r)
    rows = out.shape[1]
    if keep != rows:
        return out.to(dtype), out[:, rows - keep:], lse[:, rows - keep:]
    return out.to(dtype), out, lse


def base_rows(cached: tuple[torch.Tensor, torch.Tensor] | None, window: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached rows followed by the window part (as merge_rows takes them): float32 [B, P + 1, Hq, D] and
    [B, P + 1, Hq, 1]."""
    out_w, lse_w = window
    if cached is None:
        return out_w.float(), lse_w
    return torch.cat([cached[0], out_w], dim=1), torch.cat([cached[1], lse_w], dim=1)  # cat promotes to float32


def _merge_rows_kernel(cached: tuple[torch.Tensor, torch.Tensor] | None, window: tuple[torch.Tensor, torch.Tensor],
                       reply: tuple[torch.Tensor, torch.Tensor], keep: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out_w, lse_w = window
    out_r, lse_r = reply
    b, rows, heads, dim = out_r.shape
    past = rows - 1
    cached_out, cached_lse = cached if cached is not None else (out_w, lse_w)  # not read when P = 0
    out = torch.empty((b, rows, heads, dim), dtype=dtype, device=out_r.device)
    kept = torch.empty((b, keep, heads, dim), dtype=torch.float32, device=out_r.device)
    kept_lse = torch.empty((b, keep, heads, 1), dtype=torch.float32, device=out_r.device)
    _merge_kernel[(b * rows * heads,)](
        cached_out, cached_lse, out_w, lse_w, out_r, lse_r, out, kept, kept_lse,
        *_strides3(cached_out), *_strides3(cached_lse), *_strides3(out_w), *_strides3(lse_w),
        *_strides3(out_r), *_strides3(lse_r),
        rows, heads, dim, past, rows - keep, BLOCK=triton.next_power_of_2(dim))
    return out, kept, kept_lse


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a [B, rows, Hq, ...] tensor's first three axes (the last axis is contiguous)."""
    return t.stride(0), t.stride(1), t.stride(2)


if triton is not None:
    @triton.jit
    def _merge_kernel(cached_out, cached_lse, out_w, lse_w, out_r, lse_r, out, kept, kept_lse,
                      co_b, co_r, co_h, cl_b, cl_r, cl_h, ow_b, ow_r, ow_h, lw_b, lw_r, lw_h,
                      or_b, or_r, or_h, lr_b, lr_r, lr_h, rows, heads, dim, past, first_kept,
                      BLOCK: tl.constexpr):
        """One program per (sequence, row, head): the merge of one row of D values (out and kept contiguous).
        The parameters carry no annotations: triton reads them (only tl.constexpr is allowed)."""
        pid = tl.program_id(0)
        h = pid % heads
        r = (pid // heads) % rows
        b = pid // (heads * rows)
        cols = tl.arange(0, BLOCK)
        live = cols < dim
        if r < past:
            base = tl.load(cached_out + b * co_b + r * co_r + h * co_h + cols, mask=live, other=0.0).to(tl.float32)
            base_lse = tl.load(cached_lse + b * cl_b + r * cl_r + h * cl_h)
        else:
            base = tl.load(out_w + b * ow_b + h * ow_h + cols, mask=live, other=0.0).to(tl.float32)
            base_lse = tl.load(lse_w + b * lw_b + h * lw_h)
        got = tl.load(out_r + b * or_b + r * or_r + h * or_h + cols, mask=live, other=0.0)
        got_lse = tl.load(lse_r + b * lr_b + r * lr_r + h * lr_h)
        # sigmoid(got_lse - base_lse) without overflow: -inf (nothing new) gives 0; base_lse is finite
        diff = got_lse - base_lse
        weight = tl.where(diff >= 0, 1.0 / (1.0 + tl.exp(-diff)), tl.exp(diff) / (1.0 + tl.exp(diff)))
        merged = base + weight * (got - base)
        top = tl.maximum(base_lse, got_lse)
        lse = top + tl.log(1.0 + tl.exp(tl.minimum(base_lse, got_lse) - top))
        tl.store(out + ((b * rows + r) * heads + h) * dim + cols, merged.to(out.dtype.element_ty), mask=live)
        if r >= first_kept:
            at = (b * (rows - first_kept) + r - first_kept) * heads + h
            tl.store(kept + at * dim + cols, merged, mask=live)
            tl.store(kept_lse + at, lse)
