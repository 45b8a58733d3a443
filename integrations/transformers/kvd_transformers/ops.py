"""Pure-torch attention pieces used by the integration (device-agnostic, no kvd dependency).

Shapes follow transformers: queries [B, Hq, n, D], keys/values [B, Hkv, L, D] with Hq = G * Hkv (GQA); query
head h reads KV head h // G.

Partial attentions over disjoint key sets combine exactly by log-sum-exp:
    lse = logaddexp(lse_a, lse_b);  o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # torch >= 2.2
    from torch.nn.attention.bias import causal_lower_right as _causal_lower_right
except ImportError:  # pragma: no cover - very old torch
    _causal_lower_right = None

_NEG_INF = float("-inf")


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               mask: torch.Tensor | None = None, causal_offset: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp, computed in float32.

    q [B, Hq, n, D]; k, v [B, Hkv, L, D]. mask: bool broadcastable to [B, 1, n, L] (True = attend).
    causal_offset c: query i may attend key j only if j <= c + i (lower-right alignment when c = L - n).
    Returns out float32 [B, Hq, n, D] (zeros where a row has no key) and lse float32 [B, Hq, n] (-inf there).
    """
    b, hq, n, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.float().reshape(b, hkv, g * n, d)
    scores = torch.matmul(qf, k.float().transpose(-1, -2)).mul_(scale)  # [B, Hkv, G*n, L]
    scores = scores.view(b, hkv, g, n, length)
    keep = None
    if causal_offset is not None:
        qi = torch.arange(n, device=q.device).unsqueeze(1)
        kj = torch.arange(length, device=q.device).unsqueeze(0)
        keep = kj <= qi + causal_offset  # [n, L]
    if mask is not None:
        m = mask.reshape(mask.shape[0], n if mask.shape[-2] != 1 else 1, length)  # [B|1, n|1, L]
        keep = m if keep is None else (m & keep)
    if keep is not None:
        if keep.dim() == 2:
            keep = keep.view(1, 1, 1, *keep.shape)
        else:
            keep = keep.view(keep.shape[0], 1, 1, keep.shape[1], length)
        scores = scores.masked_fill(~keep, _NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, n]
    if keep is not None:
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probs = torch.exp(scores - safe.unsqueeze(-1))
    else:
        probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs.view(b, hkv, g * n, length), v.float())  # [B, Hkv, G*n, D]
    return out.view(b, hq, n, d), lse.view(b, hq, n)


_fused_ok: dict[str, bool] = {}


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     mask: torch.Tensor | None = None, rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query per row over the device-resident keys, with its log-sum-exp.

    q [B, Hq, 1, D]; k, v [B, Hkv, L, D]. The G = Hq / Hkv query heads of a KV head become the query axis of an
    ordinary attention over that head ([B, Hkv, G, D] x [B, Hkv, L, D]), so one fused SDPA kernel that also
    returns the log-sum-exp does the work (memory-efficient attention on CUDA, the flash kernel on the CPU);
    anything else falls back to `attend_lse`. Returns out [B, Hq, 1, D] (q's dtype on the fused path, float32
    otherwise) and lse float32 [B, Hq, 1]; with `rows`, laid out as one row of RetroAttention's rows: out
    [B, 1, Hq, D] and lse [B, 1, Hq, 1] (the same memory on the fused path, no extra op).
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    dev = q.device.type
    if mask is None and _fused_ok.get(dev, True) and k.dtype == q.dtype:
        try:
            qg = q.reshape(b, hkv, g, d)
            if dev == "cuda":
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                    qg, k, v, None, True, scale=scale)[:2]
                lse = lse[..., :g]
            elif dev == "cpu":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, k, v, scale=scale)
            else:
                raise NotImplementedError(dev)
            if rows:
                return out.reshape(b, 1, hq, d), lse.reshape(b, 1, hq, 1).float()
            return out.reshape(b, hq, 1, d), lse.reshape(b, hq, 1).float()
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            _fused_ok[dev] = False
    out, lse = attend_lse(q, k, v, scale, mask=mask)
    return (out.transpose(1, 2), lse.view(b, 1, hq, 1)) if rows else (out, lse)


def merge_into_window(out_w: torch.Tensor, lse_w: torch.Tensor, out_r: torch.Tensor, lse_r: torch.Tensor
                      ) -> torch.Tensor:
    """Exact log-sum-exp merge when the window part is never empty (decode: the current token is in it):
    o = o_W + sigmoid(lse_R - lse_W) (o_R - o_W), in float32; lse_R = -inf (nothing retrieved) gives o_W."""
    weight = torch.sigmoid(lse_r - lse_w).unsqueeze(-1)
    return torch.lerp(out_w.float(), out_r, weight)


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets (float32; -inf lse = empty set).

    out_*: [..., D]; lse_*: [...]. Where both sets are empty the output is 0 and lse -inf.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(lse_a - safe).unsqueeze(-1)
    wb = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * wa + out_b * wb, lse


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     padding: torch.Tensor | None = None, q_chunk: int = 4096) -> torch.Tensor:
    """Exact causal attention of n new queries over L = P + n keys (the first P fully visible), chunked over
    queries so that no [n, L] score matrix is ever materialised at once. Lower-right aligned: query i (the
    token at key position P + i) sees keys 0..P + i.

    q [B, Hq, n, D]; k, v [B, Hkv, L, D]; padding: bool [B, L] (False = padded key) or None.
    Returns [B, Hq, n, D] in q's dtype (SDPA numerics: flash / memory-efficient kernels where available).
    """
    b, hq, n, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    prefix = length - n
    out = q.new_empty(b, hq, n, d)
    gqa = hq != hkv
    for start in range(0, n, q_chunk):
        stop = min(n, start + q_chunk)
        kv_len = prefix + stop
        qc, kc, vc = q[:, :, start:stop], k[:, :, :kv_len], v[:, :, :kv_len]
        if padding is None and _causal_lower_right is not None:
            mask = _causal_lower_right(stop - start, kv_len)
        else:
            qi = torch.arange(start, stop, device=q.device).unsqueeze(1)
            kj = torch.arange(kv_len, device=q.device).unsqueeze(0)
            mask = (kj <= qi + prefix).view(1, 1, stop - start, kv_len)
            if padding is not None:
                # a padded query keeps its own key so that no row is empty (SDPA would give NaN there)
                own = (kj == qi + prefix).view(1, 1, stop - start, kv_len)
                mask = (mask & padding[:, None, None, :kv_len]) | own
        out[:, :, start:stop] = _sdpa(qc, kc, vc, mask, scale, gqa)
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object, scale: float, gqa: bool
          ) -> torch.Tensor:
    if gqa:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        except (TypeError, RuntimeError, NotImplementedError):
            g = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def exact_topn(q: torch.Tensor, k: torch.Tensor, n: int, begin: int = 0,
               max_block_bytes: int = 256 << 20) -> torch.Tensor:
    """Exact top-n key positions per query (by q.k, no scale needed), over keys [begin, L).

    q [Hq, s, D]; k [Hkv, L, D] (one sequence). Returns int64 [Hq, s, min(n, L - begin)] absolute
    positions ordered by decreasing score. Blocked over KV heads and queries to bound memory.
    """
    hq, s, d = q.shape
    hkv, length = k.shape[0], k.shape[1]
    g = hq // hkv
    n = min(n, length - begin)
    out = torch.empty(hq, s, n, dtype=torch.int64, device=q.device)
    if n <= 0:
        return out
    keys = k[:, begin:]
    rows = max(1, max_block_bytes // (4 * keys.shape[1]))
    compute_dtype = torch.float32 if q.device.type == "cpu" else k.dtype
    for h in range(hkv):
        kh = keys[h].to(compute_dtype)
        qh = q[h * g:(h + 1) * g].reshape(g * s, d).to(compute_dtype)
        res = torch.empty(g * s, n, dtype=torch.int64, device=q.device)
        for r in range(0, g * s, rows):
            scores = qh[r:r + rows] @ kh.T
            res[r:r + rows] = torch.topk(scores.float(), n, dim=-1, sorted=True).indices
        out[h * g:(h + 1) * g] = res.view(g, s, n) + begin
    return out
