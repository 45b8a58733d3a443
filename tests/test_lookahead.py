"""Lookahead retrieval (KVDCache(lookahead=True)) against a real daemon and full attention in float32: layer
l + 1's search starts from layer l's input; layer l + 1 then takes its top-k among those candidates."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.test_transformers_kvd import (
    SMALL,
    ProbeCache,
    _check_decomposition,
    full_attention_steps,
    kvd_steps,
    sid,
    tiny_llama,
)

kvd_transformers = pytest.importorskip("kvd_transformers")
from kvd_transformers import KVDCache  # noqa: E402
from kvd_transformers.local import LocalKvdClient  # noqa: E402
from kvd_transformers.lookahead import next_query  # noqa: E402

DECODE = 48


def test_every_position_a_candidate_equals_full_attention(shared_daemon: Any) -> None:
    """Candidates >= offloaded tokens: layer 1 chooses among everything, so the logits are full attention's
    through the prefill and every decode step, while its searches ran from layer 0's input."""
    model = tiny_llama()
    ids = torch.randint(1, 97, (1, 96 + DECODE))
    ref = full_attention_steps(model, ids, 96)
    cache = KVDCache(shared_daemon.client(), session=sid("look-exact"), top_k=4096, lookahead=True,
                     lookahead_candidates=4096, index="flat", **SMALL)
    cache.retrieve_log = []
    got = kvd_steps(model, cache, ids, 96)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5), (got - ref).abs().max()
    # layer 1 of every decode step after the first chose among lookahead candidates; layer 0 searched
    assert cache.stats.lookahead_used >= DECODE - 1 and cache.stats.lookahead_failed == 0
    kinds = {(layer, tuple(res.index_kinds)) for layer, res in cache.retrieve_log}
    assert (1, ("candidates",)) in kinds and (0, ("flat",)) in kinds and (0, ("candidates",)) not in kinds
    cache.close()


def test_small_candidate_sets_stay_close_and_the_device_part_is_exact(shared_daemon: Any) -> None:
    """24 of 48 approximate candidates: logits close to full attention, and every output is exactly the
    attention over sink + window + the positions kvd chose."""
    model = tiny_llama(sharpen=12.0)
    prompt, total = 160, 160 + 24
    ids = torch.randint(1, 97, (1, total))
    ref = full_attention_steps(model, ids, prompt)
    client = shared_daemon.client()
    cache = ProbeCache(client, session=sid("look-small"), top_k=24, lookahead=True, lookahead_candidates=48,
                       index="flat", **SMALL)
    got = kvd_steps(model, cache, ids, prompt)
    cos = torch.nn.functional.cosine_similarity(got[0], ref[0], dim=-1)
    assert cos.min() > 0.97, cos.min()
    assert cache.stats.lookahead_used >= 20
    _check_decomposition(client, cache)
    cache.close()


def test_next_query_is_what_the_layer_computes_from_that_input() -> None:
    """next_query(layer, h) equals the query the layer's attention receives when its input is h."""
    model = tiny_llama(seed=3)
    kvd_transformers.enable(model)
    seen: dict[str, Any] = {}

    def before(module: Any, args: tuple, kwargs: dict) -> None:
        seen["hidden"], seen["rotary"] = args[0], kwargs["position_embeddings"]

    def attention(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen["query"] = query
        return original(module, query, *args, **kwargs)

    layer = model.model.layers[1]
    original = kvd_transformers.kvd_attention_forward
    hook = layer.register_forward_pre_hook(before, with_kwargs=True)
    from transformers import AttentionInterface

    AttentionInterface.register("probe", attention)
    model.set_attn_implementation("probe")
    try:
        with torch.no_grad():
            model(torch.randint(1, 97, (2, 7)))
            expected = next_query(layer, seen["hidden"], seen["rotary"])
    finally:
        hook.remove()
    torch.testing.assert_close(expected, seen["query"], rtol=0, atol=0)


def test_batch_rows_equal_alone(shared_daemon: Any) -> None:
    model = tiny_llama(sharpen=8.0)
    ids = torch.randint(1, 97, (2, 120))
    client = shared_daemon.client()
    knobs = {"top_k": 8, "lookahead": True, "lookahead_candidates": 16, **SMALL}
    batch = kvd_steps(model, KVDCache(client, session=[sid("lb0"), sid("lb1")], **knobs), ids, 80)
    for row in range(2):
        alone = kvd_steps(model, KVDCache(client, session=sid(f"la{row}"), **knobs), ids[row:row + 1], 80)
        assert torch.allclose(batch[row], alone[0], atol=1e-5), (batch[row] - alone[0]).abs().max()


def test_bad_lookahead_settings_are_refused(shared_daemon: Any) -> None:
    client = shared_daemon.client()
    with pytest.raises(ValueError, match="lookahead_candidates"):
        KVDCache(client, lookahead=True, top_k=64, lookahead_candidates=32)
    with pytest.raises(ValueError, match="retro"):
        KVDCache(client, lookahead=True, retro=True)
    with pytest.raises(ValueError, match="sibling"):
        KVDCache(LocalKvdClient(), lookahead=True)


def test_search_params_reach_the_daemon(shared_daemon: Any) -> None:
    """search_params go with every decode Retrieve, lookahead_params with the lookahead searches: valid thread
    counts change no result; a bad one is refused by the daemon (the decode fails; a failed lookahead search
    falls back to a normal Retrieve)."""
    model = tiny_llama()
    ids = torch.randint(1, 97, (1, 96 + 12))
    ref = full_attention_steps(model, ids, 96)
    knobs = {"top_k": 4096, "lookahead": True, "lookahead_candidates": 4096, "index": "flat", **SMALL}
    cache = KVDCache(shared_daemon.client(), session=sid("look-params"), search_params={"threads": "2"},
                     lookahead_params={"threads": "1"}, **knobs)
    got = kvd_steps(model, cache, ids, 96)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5), (got - ref).abs().max()
    assert cache.stats.lookahead_used >= 11 and cache.stats.lookahead_failed == 0
    cache.close()
    cache = KVDCache(shared_daemon.client(), session=sid("look-badla"), lookahead_params={"threads": "x"}, **knobs)
    got = kvd_steps(model, cache, ids, 96)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5), (got - ref).abs().max()
    assert cache.stats.lookahead_failed >= 11 and cache.stats.lookahead_used == 0
    cache.close()
    cache = KVDCache(shared_daemon.client(), session=sid("look-bad"), search_params={"threads": "x"}, **knobs)
    with pytest.raises(Exception, match="threads"):
        kvd_steps(model, cache, ids, 96)
    cache.close()
