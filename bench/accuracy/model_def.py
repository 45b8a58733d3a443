"""The accuracy model: a small Llama (GQA, RoPE) and loading/saving of its committed weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.accuracy.tasks import BOS, PAD, VOCAB_SIZE

MODEL_DIR = Path(__file__).resolve().parent / "model"


def llama_config(layers: int = 6, hidden: int = 256, heads: int = 4, kv_heads: int = 2, intermediate: int = 768,
                 max_positions: int = 16384, rope_theta: float = 100000.0) -> LlamaConfig:
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=hidden // heads, max_position_embeddings=max_positions,
                      rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def load_model(path: str | Path = MODEL_DIR, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               rope_scaling: dict[str, Any] | None = None) -> LlamaForCausalLM:
    """The committed model (stored in float16) in `dtype`, eval mode, SDPA attention. rope_scaling: e.g.
    {"rope_type": "dynamic", "factor": 4.0} (merged into the config's rope parameters)."""
    cfg = LlamaConfig.from_pretrained(path)
    if rope_scaling:
        cfg.rope_parameters = {**cfg.rope_parameters, **rope_scaling}
    model = LlamaForCausalLM.from_pretrained(path, config=cfg, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.pad_token_id = PAD
    return model.to(device).eval()


def save_model(model: LlamaForCausalLM, path: str | Path) -> None:
    """Weights as float16 safetensors (about 10 MB) plus config.json."""
    Path(path).mkdir(parents=True, exist_ok=True)
    half = LlamaForCausalLM(model.config)
    half.load_state_dict(model.state_dict())
    half.to(torch.float16).save_pretrained(path, safe_serialization=True)
