"""The "kvd" attention implementation for transformers 5.x: an attention function (AttentionInterface) and its
mask function (AttentionMaskInterface).

The mask function does not build a [q, kv] mask (at 512K tokens that alone would be gigabytes); it hands the
attention function a small `KVDMask` with the 2D padding mask (None when nothing is padded). The attention
function finds the `KVDCache` whose `update` produced the key tensor it receives and lets it attend; with any
other cache (or none) it falls back to exact SDPA attention, so a model switched to "kvd" still runs with
`DynamicCache` or without a cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvd_transformers import lookahead, ops, retro
from kvd_transformers.cache import note_input_ids, take_update

NAME = "kvd"


@dataclass
class KVDMask:
    """What the mask function passes to every layer of one forward.

    padding: bool [B, kv_length] over token positions 0..kv_length-1 (False = padded), or None.
    first_valid: per row, the first non-padded position (None when there is no padding).
    """

    q_length: int
    kv_length: int
    q_offset: int
    padding: torch.Tensor | None = None
    first_valid: list[int] | None = None
    memo: dict[Any, Any] = field(default_factory=dict)


def kvd_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
             mask_function: Any = None, attention_mask: torch.Tensor | None = None,
             local_size: int | None = None, device: Any = "cpu", **kwargs: Any) -> KVDMask:
    """AttentionMaskInterface entry for "kvd" (signature of transformers' sdpa_mask, 5.17 .. 5.23)."""
    if local_size is not None or kwargs.get("sliding_window") is not None:
        raise NotImplementedError("kvd attention supports full-attention layers only (no sliding/chunked windows)")
    if kv_offset:
        raise NotImplementedError("kvd attention expects kv_offset == 0")
    q_off = int(q_offset) if not isinstance(q_offset, int) else q_offset
    padding = None
    first_valid = None
    if attention_mask is not None and attention_mask.dim() == 2:
        am = attention_mask.to(dtype=torch.bool)
        if am.shape[-1] < kv_length:
            am = torch.nn.functional.pad(am, (0, kv_length - am.shape[-1]), value=True)
        am = am[:, :kv_length]
        if not bool(am.all()):
            padding = am
            first_valid = [int(x) for x in am.int().argmax(dim=-1).tolist()]
    return KVDMask(q_length=q_length, kv_length=kv_length, q_offset=q_off, padding=padding,
                   first_valid=first_valid)


def kvd_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry for "kvd". query [B, Hq, n, D]; key/value as returned by the cache's update.
    Returns ([B, n, Hq, D], None)."""
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    found = take_update(key)
    if found is not None:
        cache, layer_idx = found
        out = cache.attend(module, layer_idx, query, key, value, attention_mask, scale)
    else:
        out = _fallback(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def _fallback(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, scale: float
              ) -> torch.Tensor:
    """Exact attention when no KVDCache is involved: causal, lower-right aligned, with optional padding."""
    if isinstance(mask, torch.Tensor):  # a 4D mask prepared by someone else
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        o, _ = ops.attend_lse(query, key, value, scale, mask=mask)
        return o.to(query.dtype)
    padding = getattr(mask, "padding", None)
    if padding is not None:
        padding = padding[:, -key.shape[2]:]
    return ops.causal_attention(query, key, value, scale, padding=padding)


def _note_ids(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    note_input_ids(args[0] if args and isinstance(args[0], torch.Tensor) else None)


_registered = False


def register() -> None:
    """Register "kvd" with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, kvd_attention_forward)
    AttentionMaskInterface.register(NAME, kvd_mask)
    _registered = True


def enable(model: Any) -> Any:
    """Switch a loaded transformers model to kvd attention; returns the model.

    Afterwards pass `past_key_values=KVDCache(client, session=...)` to `generate` or `forward`."""
    register()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None or "sliding_attention" in layer_types:
            raise NotImplementedError("models with sliding-window attention layers are not supported by kvd")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and not getattr(embeddings, "_kvd_hooked", False):
        # the cache stores each forward's token ids with its K/V (history checks, prefix lookup)
        embeddings.register_forward_pre_hook(_note_ids)
        embeddings._kvd_hooked = True
    retro.install(model)  # inert unless a KVDCache(retro=True) is passed
    lookahead.install(model)  # inert unless a KVDCache(lookahead=True) is passed
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = NAME
    return model


__all__ = ["NAME", "KVDMask", "enable", "kvd_attention_forward", "kvd_mask", "register"]
