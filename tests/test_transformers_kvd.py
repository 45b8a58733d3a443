"""The transformers integration against a real kvd daemon (subprocess on a temporary socket), with a tiny
randomly initialised Llama (GQA: 4 query heads over 2 KV heads) in float32 on the CPU."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    import kvd_transformers
except ImportError:  # the editable install predates the package: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "transformers"))
    import kvd_transformers

from kvd_transformers import KVDCache

transformers = pytest.importorskip("transformers")

SINK, WINDOW, FLUSH = 4, 16, 8
SMALL = {"sink_tokens": SINK, "window_tokens": WINDOW, "flush_tokens": FLUSH}


def tiny_llama(sharpen: float = 1.0, seed: int = 0) -> Any:
    """A 2-layer random Llama; `sharpen` scales q/k projections so attention concentrates like a trained
    model's (random weights alone give near-uniform attention, where no top-k can be close)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                   max_position_embeddings=2048, pad_token_id=0, bos_token_id=None,
                                   eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    if sharpen != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(sharpen)
                layer.self_attn.k_proj.weight.mul_(sharpen)
    return model


def sid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def full_attention_steps(model: Any, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits at positions prompt-1 .. T-1 with exact attention (teacher forcing)."""
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return model(ids).logits[:, prompt - 1:]


def kvd_steps(model: Any, cache: KVDCache, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill `prompt` tokens, then feed the rest one token per forward (teacher forcing)."""
    kvd_transformers.enable(model)
    with torch.no_grad():
        out = [model(ids[:, :prompt], past_key_values=cache).logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(out, dim=1)


def left_padded_batch(length: int = 64, pad: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of random token ids, the first left-padded by `pad` tokens, and their attention mask."""
    ids = torch.randint(1, 97, (2, length))
    ids[0, :pad] = 0
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def generate(model: Any, ids: torch.Tensor, cache: Any, new: int, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.generate(ids, past_key_values=cache, max_new_tokens=new, do_sample=False,
                              output_scores=True, return_dict_in_generate=True, **kwargs)


def test_large_k_equals_full_attention(shared_daemon: Any) -> None:
    """k >= offloaded tokens: prefill + 64 decode steps give full attention's logits (fp32)."""
    model = tiny_llama()
    ids = torch.randint(1, 97, (1, 96 + 64))
    ref = full_attention_steps(model, ids, 96)
    client = shared_daemon.client()
    cache = KVDCache(client, session=sid("exact"), top_k=4096, index="flat", **SMALL)
    got = kvd_steps(model, cache, ids, 96)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5), (got - ref).abs().max()
    assert cache.stats.retrieve_calls >= 2 * 64  # every decode step of every layer used kvd
    cache.flush()
    info = client.get_session(cache.session_ids[0])
    assert list(info.layer_tokens) == [ids.shape[1]] * 2
    # the device holds only sink + window (+ the flush batch) per layer
    for layer in cache.layers:
        assert layer.used <= SINK + WINDOW + FLUSH
        assert layer.buf_k is not None and layer.buf_k.shape[2] == SINK + WINDOW + FLUSH
    cache.close()


def test_overlap_switched_between_steps_keeps_full_attention_logits(shared_daemon: Any) -> None:
    """set_overlap turns the Retrieve worker thread on and off between forwards; either way every step equals
    full attention (k >= offloaded tokens)."""
    model = tiny_llama()
    ids = torch.randint(1, 97, (1, 96 + 24))
    ref = full_attention_steps(model, ids, 96)
    cache = KVDCache(shared_daemon.client(), session=sid("overlap"), top_k=4096, index="flat", overlap=True,
                     **SMALL)
    kvd_transformers.enable(model)
    threads_seen = set()
    with torch.no_grad():
        out = [model(ids[:, :96], past_key_values=cache).logits[:, -1]]
        for t in range(96, ids.shape[1]):
            if t % 8 == 0:
                cache.set_overlap(not cache.config.overlap)
                assert (cache._retriever is not None) == cache.config.overlap
            threads_seen.add(cache.config.overlap)
            out.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    got = torch.stack(out, dim=1)
    assert threads_seen == {True, False}
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5), (got - ref).abs().max()
    cache.close()


class ProbeCache(KVDCache):
    """Records, per attention call, the query, the output and the device layout (sink/window)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probes: list[tuple[int, torch.Tensor, torch.Tensor, int, int, int]] = []
        self.retrieve_log = []

    def attend(self, module: Any, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: Any, scale: float) -> torch.Tensor:
        out = super().attend(module, layer_idx, query, key, value, mask, scale)
        layer = self.layers[layer_idx]
        self.probes.append((layer_idx, query.detach().clone(), out.detach().clone(), layer.sink_len,
                            layer.win_len, layer.total))
        return out


def test_small_k_close_and_window_exact(shared_daemon: Any) -> None:
    """Small k: logits stay close to full attention (closer than with k=1), and every output is exactly the
    attention over sink + window + the retrieved positions (the device part is exact)."""
    model = tiny_llama(sharpen=12.0)
    prompt, total = 160, 160 + 24
    ids = torch.randint(1, 97, (1, total))
    ref = full_attention_steps(model, ids, prompt)
    client = shared_daemon.client()
    errors = {}
    for k in (1, 24):
        cache = ProbeCache(client, session=sid(f"small{k}"), top_k=k, index="flat", **SMALL)
        got = kvd_steps(model, cache, ids, prompt)
        errors[k] = (got - ref).abs().max().item()
        if k == 24:
            cos = torch.nn.functional.cosine_similarity(got[0], ref[0], dim=-1)
            assert cos.min() > 0.98, cos.min()
            assert (got[0].argmax(-1) == ref[0].argmax(-1)).float().mean() >= 0.9
            _check_decomposition(client, cache)
        cache.close()
    assert errors[24] < errors[1]


def _check_decomposition(client: Any, cache: ProbeCache) -> None:
    sid0 = cache.session_ids[0]
    cache.flush()
    fetched = client.fetch(sid0, 0, cache.get_seq_length())
    retrieved = iter(cache.retrieve_log)
    scale = 16 ** -0.5
    checked = 0
    for layer_idx, q, out, s, w, total in cache.probes:
        if q.shape[2] != 1 or total - w <= SINK:
            continue
        log_layer, res = next(retrieved)
        assert log_layer == layer_idx
        ids = res.ids[0]  # [Hq, k]
        keys, values = fetched.keys[layer_idx, :, :total].float(), fetched.values[layer_idx, :, :total].float()
        for h in range(q.shape[1]):
            kv_head = h // 2
            picked = ids[h][ids[h] >= 0]
            assert ((picked >= SINK) & (picked < total - w)).all()  # retrieval never re-reads the device part
            pos = torch.cat([torch.arange(s), torch.arange(total - w, total), picked])
            scores = keys[kv_head, pos] @ q[0, h, 0].float() * scale
            expected = torch.softmax(scores, 0) @ values[kv_head, pos]
            assert torch.allclose(out[0, h, 0].float(), expected, atol=1e-5)
        checked += 1
    assert checked >= 2 * 20


def test_multi_turn_continuation_equals_one_long_run(shared_daemon: Any) -> None:
    """Turn 2 continues the stored session (fetching sink + window, computing only the new tokens) and gives
    what one uninterrupted full-attention run gives."""
    model = tiny_llama()
    client = shared_daemon.client()
    session = sid("chat")
    prompt1 = torch.randint(1, 97, (1, 70))
    kvd_transformers.enable(model)
    cache1 = KVDCache(client, session=session, top_k=4096, **SMALL)
    turn1 = generate(model, prompt1, cache1, 20)
    cache1.close()
    history = torch.cat([turn1.sequences, torch.randint(1, 97, (1, 30))], dim=1)

    cache2 = KVDCache(client, session=session, top_k=4096, **SMALL)
    assert cache2.get_seq_length() == 70 + 20 - 1  # the last sampled token was never fed
    # the session stored its token ids: the history is checked before continuing
    assert torch.equal(cache2.history(), history[0, :89])
    cache2.check_history(history)
    wrong = history.clone()
    wrong[0, 5] = (wrong[0, 5] + 1) % 97
    with pytest.raises(ValueError, match="different history"):
        cache2.check_history(wrong)
    seen: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        turn2 = generate(model, history, cache2, 20)
    finally:
        hook.remove()
    assert seen[0] == history.shape[1] - (70 + 20 - 1)  # only the new tokens were computed
    cache2.close()

    model.set_attn_implementation("sdpa")
    full = generate(model, history, transformers.DynamicCache(config=model.config), 20)
    assert torch.equal(turn2.sequences, full.sequences)
    for a, b in zip(turn2.scores, full.scores, strict=True):
        assert torch.allclose(a, b, atol=2e-5)


def test_daemon_restart_between_turns(kvd_daemon: Any) -> None:
    """Persist, restart the daemon, continue: identical to not restarting."""
    from kvd_client import FailedPreconditionError

    model = tiny_llama(seed=3)
    session = sid("restart")
    prompt = torch.randint(1, 97, (1, 60))
    kvd_transformers.enable(model)
    client = kvd_daemon.client()
    cache = KVDCache(client, session=session, top_k=4096, **SMALL)
    turn1 = generate(model, prompt, cache, 12)
    try:
        cache.persist()
    except FailedPreconditionError as exc:
        cache.close()
        pytest.skip(f"daemon cannot persist yet: {exc}")
    cache.close()
    client.close()
    kvd_daemon.restart()
    history = torch.cat([turn1.sequences, torch.randint(1, 97, (1, 10))], dim=1)
    client = kvd_daemon.client()
    cache2 = KVDCache(client, session=session, top_k=4096, **SMALL)
    assert cache2.get_seq_length() == 60 + 12 - 1
    turn2 = generate(model, history, cache2, 12)
    cache2.close()
    model.set_attn_implementation("sdpa")
    full = generate(model, history, transformers.DynamicCache(config=model.config), 12)
    assert torch.equal(turn2.sequences, full.sequences)


def test_batch_rows_equal_alone(shared_daemon: Any) -> None:
    """Batch of 2 (a session per row) with a small k: each row gets exactly what it gets alone."""
    model = tiny_llama(sharpen=8.0)
    ids = torch.randint(1, 97, (2, 120))
    client = shared_daemon.client()
    batch = kvd_steps(model, KVDCache(client, session=[sid("b0"), sid("b1")], top_k=8, **SMALL), ids, 80)
    for row in range(2):
        alone = kvd_steps(model, KVDCache(client, session=sid(f"alone{row}"), top_k=8, **SMALL), ids[row:row + 1],
                          80)
        assert torch.allclose(batch[row], alone[0], atol=1e-5), (batch[row] - alone[0]).abs().max()


def test_generate_padded_batch_and_sampling(shared_daemon: Any) -> None:
    """generate() with a left-padded batch (greedy) and with sampling equals full attention when k covers
    the offloaded part."""
    model = tiny_llama(seed=5)
    client = shared_daemon.client()
    ids, mask = left_padded_batch()
    model.set_attn_implementation("sdpa")
    ref = generate(model, ids, transformers.DynamicCache(config=model.config), 24, attention_mask=mask)
    torch.manual_seed(7)
    ref_s = model.generate(ids, attention_mask=mask, past_key_values=transformers.DynamicCache(config=model.config),
                           max_new_tokens=24, do_sample=True, top_k=20)
    kvd_transformers.enable(model)
    got = generate(model, ids, KVDCache(client, top_k=4096, **SMALL), 24, attention_mask=mask)
    assert torch.equal(got.sequences, ref.sequences)
    torch.manual_seed(7)
    got_s = model.generate(ids, attention_mask=mask, past_key_values=KVDCache(client, top_k=4096, **SMALL),
                           max_new_tokens=24, do_sample=True, top_k=20)
    assert torch.equal(got_s, ref_s)


def test_indexes_are_built_from_the_prefill_hints(shared_daemon: Any) -> None:
    """The first decode step's Retrieve of a layer waits for the append that carries the layer's index hints:
    one that reached the daemon first would start the index build without them (not attention-aware)."""
    model = tiny_llama(sharpen=8.0)
    ids = torch.randint(1, 97, (1, 420))
    client = shared_daemon.client()
    cache = KVDCache(client, session=sid("hints"), top_k=8, index="graph",
                     index_params={"window": "2", "enhance_ef": "0"}, **SMALL)
    kvd_steps(model, cache, ids, 400)
    cache.flush()
    deadline = time.time() + 60
    while True:
        indexes = client.get_session(cache.session_ids[0]).indexes
        if len(indexes) == 2 and all(i["ready"] for i in indexes):
            break
        assert time.time() < deadline, indexes
        time.sleep(0.05)
    assert [i["from_hints"] for i in indexes] == [True, True]
    cache.close()


def test_plan_settings_are_made_once_and_follow_changes_of_the_search_params() -> None:
    """The prepared plans' settings are kept between decode layers, and made again when config.search_params is
    replaced or changed in place (a plan key that missed the change would run the old search)."""
    from kvd_transformers.local import LocalKvdClient

    cache = KVDCache(LocalKvdClient())
    params, settings = cache._plan_settings()
    assert params == {} and cache._plan_settings()[1] is settings
    cache.config.search_params = {"ef": "64"}
    assert cache._plan_settings()[1][-1] == (("ef", "64"),)
    assert cache.config.search_params is not None
    cache.config.search_params["ef"] = "128"
    assert cache._plan_settings() == ({"ef": "128"}, (cache.config.top_k, False, (("ef", "128"),)))
