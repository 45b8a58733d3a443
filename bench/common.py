"""Pieces shared by the decode benchmarks: the 8B-shaped random Llama, device sync, a timed chunked prefill,
waiting for a session's indexes, and the markdown table every benchmark prints last."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig


def random_llama(layers: int, device: torch.device, cpu_smoke: bool, max_positions: int
                 ) -> tuple[Any, LlamaConfig]:
    """Llama-3-8B shape with random bf16 weights (same cost as the real model), or a tiny float32 one on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM  # only the decode benchmarks need transformers

    if cpu_smoke:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=1 << 16)
        dtype = torch.float32
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=max_positions,
                          rope_theta=500000.0)
        dtype = torch.bfloat16
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model, cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def chunked_prefill(model: Any, ids: torch.Tensor, cache: Any, chunk: int) -> tuple[float, torch.Tensor]:
    """Prefill ids [batch, n] in chunks into cache: (seconds, the last position's logits [batch, 1, vocab])."""
    sync(ids.device)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            out = model(ids[:, start:start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(ids.device)
    return time.perf_counter() - started, out.logits[:, -1:]


def wait_indexes(client: Any, sid: str, timeout: float) -> float | None:
    """Seconds until every layer's index is ready (None: flat / no index kind; -1: timed out)."""
    t0 = time.perf_counter()
    while True:
        info = client.get_session(sid)
        kinds = [i for i in info.indexes if i.get("kind") not in ("", "flat")]
        if not kinds and info.index_kind in ("", "flat"):
            return None
        if kinds and len(kinds) == info.num_layers and all(i["ready"] for i in kinds):
            return round(time.perf_counter() - t0, 2)
        if time.perf_counter() - t0 > timeout:
            return -1.0
        time.sleep(0.5)


def kvd_time_split(stats: Any, steps: int) -> dict[str, float]:
    """Where a KVDCache's decode time went, ms per token over `steps` (CacheStats): blocked on kvd, the rest of
    the attention function, the query's copy to the host, the calls (transport + client), the daemon's share,
    and of that the search and the attention (each also as its compiled kernel alone)."""
    def per_token(seconds: float) -> float:
        return round(1000 * seconds / max(1, steps), 2)

    return {"kvd_wait_ms_per_token": per_token(stats.retrieve_wait_s),
            "attention_other_ms_per_token": per_token(stats.decode_s - stats.retrieve_wait_s),
            "kvd_query_sync_ms_per_token": per_token(stats.query_sync_s),
            "kvd_rpc_ms_per_token": per_token(stats.retrieve_rpc_s),
            "kvd_server_ms_per_token": per_token(stats.retrieve_server_s),
            "kvd_search_ms_per_token": per_token(stats.retrieve_search_s),
            "kvd_attend_ms_per_token": per_token(stats.retrieve_attend_s),
            "kvd_search_kernel_ms_per_token": per_token(getattr(stats, "retrieve_search_kernel_s", 0.0)),
            "kvd_attend_kernel_ms_per_token": per_token(getattr(stats, "retrieve_attend_kernel_s", 0.0))}


def markdown_table(rows: Sequence[dict[str, Any]], cols: Sequence[tuple[str, str]],
                   missing: Callable[[dict[str, Any], str], Any] = lambda row, key: "") -> str:
    """cols: (key, header) pairs; a cell a row lacks shows missing(row, key)."""
    lines = [" | ".join(h for _, h in cols), " | ".join("-" * len(h) for _, h in cols)]
    lines += [" | ".join(str(r[key] if key in r else missing(r, key)) for key, _ in cols) for r in rows]
    return "\n".join(lines)


def spin(count: int) -> list[subprocess.Popen]:
    """`count` processes that spin on a core each (a busy host: like a GPU process's own threads); kill them after."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
