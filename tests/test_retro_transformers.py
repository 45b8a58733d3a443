"""RetroAttention in the transformers integration (KVDCache(retro=True)) against a real kvd daemon, with tiny
random Llamas in float32 on the CPU (helpers from test_transformers_kvd)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tests.test_transformers_kvd import (
    SINK,
    SMALL,
    full_attention_steps,
    generate,
    kvd_steps,
    left_padded_batch,
    sid,
    tiny_llama,
)

transformers = pytest.importorskip("transformers")
import kvd_transformers  # noqa: E402
from kvd_transformers import KVDCache, KVDConfig  # noqa: E402
from kvd_transformers.layer import resident_positions  # noqa: E402
from kvd_transformers.local import LocalKvdClient  # noqa: E402


def decode_steps_run(prompt: int, total: int, window: int) -> int:
    """Past rows re-run over a teacher-forced run: step i (0-based) re-runs min(i, w - 1) positions."""
    return sum(min(i, window - 1) for i in range(total - prompt))


@pytest.mark.parametrize(("window", "overlap"), [(2, False), (4, True)])
def test_exact_retrieval_changes_nothing(shared_daemon: Any, window: int, overlap: bool) -> None:
    """k >= offloaded: no key is ever new to a past query, so retro gives full attention's logits, like the
    plain path, while it re-runs the cached positions every step (overlap: Retrieve in the worker thread)."""
    model = tiny_llama()
    ids = torch.randint(1, 97, (1, 96 + 64))
    ref = full_attention_steps(model, ids, 96)
    client = shared_daemon.client()
    cache = KVDCache(client, session=sid("rexact"), top_k=4096, index="flat", retro=True, retro_window=window,
                     overlap=overlap, **SMALL)
    got = kvd_steps(model, cache, ids, 96)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5), (got - ref).abs().max()
    assert cache.retro is not None
    assert cache.retro.rerun_rows == decode_steps_run(96, ids.shape[1], window)
    assert cache.retro.corrections == 0
    assert cache.stats.retrieve_calls >= 2 * 60
    cache.close()


def test_flush_mid_generation_ends_corrections(shared_daemon: Any) -> None:
    """flush() sends the held-back positions to kvd: they can no longer be re-run, so the corrections restart
    from the next step, and the result is still exact with k >= offloaded."""
    model = tiny_llama(seed=4)
    ids = torch.randint(1, 97, (1, 96 + 40))
    ref = full_attention_steps(model, ids, 96)
    kvd_transformers.enable(model)
    cache = KVDCache(shared_daemon.client(), session=sid("rflush"), top_k=4096, retro=True, retro_window=3, **SMALL)
    got = []
    with torch.no_grad():
        got.append(model(ids[:, :96], past_key_values=cache).logits[:, -1])
        for t in range(96, ids.shape[1]):
            if t == 116:
                cache.flush()
                assert cache.layers[0].submitted == cache.layers[0].total
            got.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    assert torch.allclose(torch.stack(got, 1), ref, atol=2e-5)
    assert cache.retro is not None
    # 40 steps re-run min(i, 2) rows each, except that the step after the flush re-runs none and the next one
    assert cache.retro.rerun_rows == decode_steps_run(96, ids.shape[1], 3) - 2 - 1
    cache.close()


def test_generate_padded_batch_exact(shared_daemon: Any) -> None:
    """generate() with a left-padded batch of 2 and retro (w=3), k covering the offloaded part: the same tokens
    and scores as full attention; every step's scores are for the new token only."""
    model = tiny_llama(seed=5)
    ids, mask = left_padded_batch()
    model.set_attn_implementation("sdpa")
    ref = generate(model, ids, transformers.DynamicCache(config=model.config), 40, attention_mask=mask)
    kvd_transformers.enable(model)
    cache = KVDCache(shared_daemon.client(), top_k=4096, retro=True, retro_window=3, **SMALL)
    got = generate(model, ids, cache, 40, attention_mask=mask)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores, strict=True):
        assert a.shape == (2, 97)
        assert torch.allclose(a, b, atol=2e-5)
    assert cache.retro is not None and cache.retro.rerun_rows > 0
    cache.close()


class RetroProbe(KVDCache):
    """Records every decode attention call: queries, outputs, resident positions and K/V, the Retrieve reply."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retrieve_log = []
        self.calls: list[dict[str, Any]] = []

    def attend(self, module: Any, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: Any, scale: float) -> torch.Tensor:
        before = len(self.retrieve_log)
        out = super().attend(module, layer_idx, query, key, value, mask, scale)
        layer = self.layers[layer_idx]
        pos = resident_positions(layer)
        replies = self.retrieve_log[before:]
        self.calls.append({
            "layer": layer_idx, "query": query.detach().clone(), "out": out.detach().clone(), "returned": out,
            "total": layer.total,
            "end": layer.offloaded_end(), "positions": torch.arange(layer.total) if pos is None else pos,
            "keys": key.detach().clone(), "values": value.detach().clone(),
            "ids": replies[-1][1].ids if replies else None})
        return out


def union_reference(birth: dict[str, Any], later: list[dict[str, Any]], row: int, kv: tuple[torch.Tensor, ...],
                    layer: int, scale: float) -> torch.Tensor:
    """Attention (float64) of the query a position had at its own step over its device window at that step plus
    every key retrieved since (at that step and at `later` ones) below its offload bound. kv: kvd's K/V."""
    keys, values = kv
    q = birth["query"][row, :, -1].double()  # [Hq, D]
    hq, group = q.shape[0], q.shape[0] // keys.shape[1]
    out = torch.empty(hq, q.shape[1], dtype=torch.float64)
    for h in range(hq):
        kv_head = h // group
        retrieved = set()
        for call in [birth, *later]:
            if call["ids"] is not None:
                retrieved |= {int(i) for i in call["ids"][row, h] if 0 <= int(i) < birth["end"]}
        ids = sorted(retrieved)
        k = torch.cat([birth["keys"][row, kv_head].double(), keys[layer, kv_head, ids].double()])
        v = torch.cat([birth["values"][row, kv_head].double(), values[layer, kv_head, ids].double()])
        out[h] = torch.softmax(k @ q[h] * scale, 0) @ v
    return out


def check_unions(cache: RetroProbe, client: Any, window: int) -> int:
    """Every output of every decode call (new and re-run rows) equals its union reference; returns how many
    re-run rows differ from their first output (i.e. were really corrected)."""
    cache.flush()
    fetched = [client.fetch(s, 0, cache.get_seq_length()) for s in cache.session_ids]
    scale = 16 ** -0.5
    births: dict[tuple[int, int], int] = {}  # (layer, position) -> index of the call where it was the new token
    changed = checked = 0
    for c, call in enumerate(cache.calls):
        n = call["query"].shape[2]
        if n > window:
            continue  # the prefill
        births[(call["layer"], call["total"] - 1)] = c
        for r in range(n):
            position = call["total"] - n + r
            birth = cache.calls[births[(call["layer"], position)]]
            later = [x for x in cache.calls[births[(call["layer"], position)] + 1: c + 1]
                     if x["layer"] == call["layer"]]
            assert len(later) == n - 1 - r  # a position is re-run at the w - 1 steps after its own
            for row, got in enumerate(fetched):
                ref = union_reference(birth, later, row, (got.keys, got.values), call["layer"], scale)
                assert torch.allclose(call["out"][row, :, r].double(), ref, atol=1e-5), (call["layer"], position)
                checked += 1
                first = birth["out"][row, :, -1]
                changed += int(r < n - 1 and not torch.allclose(call["out"][row, :, r], first, atol=1e-4))
    assert checked > 0
    return changed


def test_corrected_outputs_equal_union_attention(shared_daemon: Any) -> None:
    """Small k, w=3, a batch of 2: every re-run row's output is exactly the attention of its cached query over
    its window at its step plus the union of the keys retrieved since (below its offload bound), and the
    corrections really change outputs and logits. The in-process exact client gives the same logits."""
    model = tiny_llama(sharpen=12.0)
    ids = torch.randint(1, 97, (2, 120 + 40))
    client = shared_daemon.client(shm=False)  # inline tensors here; the other tests use shared memory
    cache = RetroProbe(client, session=[sid("ru0"), sid("ru1")], top_k=3, index="flat", retro=True, retro_window=3,
                       **SMALL)
    got = kvd_steps(model, cache, ids, 120)
    assert cache.retro is not None and cache.retro.corrections > 0
    assert check_unions(cache, client, 3) > 10
    # the outputs handed to the model are its own: not rows of the output cache that later steps rewrite
    assert all(torch.equal(call["returned"], call["out"]) for call in cache.calls)
    local = kvd_steps(model, KVDCache(LocalKvdClient(), session=["l0", "l1"], top_k=3, retro=True, retro_window=3,
                                      **SMALL), ids, 120)
    assert torch.allclose(got, local, atol=1e-5), (got - local).abs().max()
    # the corrections reach the logits (through the recomputed K/V of the re-run positions)
    plain = kvd_steps(model, KVDCache(client, session=[sid("rp0"), sid("rp1")], top_k=3, **SMALL), ids, 120)
    assert not torch.allclose(got, plain, atol=1e-4)
    cache.close()


def test_batch_rows_equal_alone(shared_daemon: Any) -> None:
    """Batch of 2 with retro (w=4) and a small k: each row gets exactly what it gets alone."""
    model = tiny_llama(sharpen=8.0)
    ids = torch.randint(1, 97, (2, 120))
    client = shared_daemon.client()
    retro = {"retro": True, "retro_window": 4, "top_k": 8}
    batch = kvd_steps(model, KVDCache(client, session=[sid("rb0"), sid("rb1")], **retro, **SMALL), ids, 80)
    for row in range(2):
        alone = kvd_steps(model, KVDCache(client, session=sid(f"ra{row}"), **retro, **SMALL), ids[row:row + 1], 80)
        assert torch.allclose(batch[row], alone[0], atol=1e-5), (batch[row] - alone[0]).abs().max()


def test_cache_bounded_and_stale_kv_overwritten(shared_daemon: Any) -> None:
    """w=8 over 400 generated tokens: the output cache never holds more than w-1 steps (and at most (w-1)*k
    seen ids per entry), its bytes stop growing, the device buffers keep their size; kvd ends up with each
    position's K/V from its last re-run (which differ from its first computation above layer 0)."""
    window, k = 8, 4
    model = tiny_llama(sharpen=12.0, seed=2)
    kvd_transformers.enable(model)
    client = shared_daemon.client()
    cache = KVDCache(client, session=sid("rbound"), top_k=k, retro=True, retro_window=window, **SMALL)
    assert cache.config.hold_tokens == window - 1  # raised automatically so that re-run positions stay out of kvd
    first_kv: dict[tuple[int, int], torch.Tensor] = {}
    last_kv: dict[tuple[int, int], torch.Tensor] = {}
    original = cache.update

    def recording_update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                         **kwargs: Any) -> Any:
        got = original(key_states, value_states, layer_idx, *args, **kwargs)
        end = cache.layers[layer_idx].total
        for i in range(key_states.shape[2]):
            slot = (layer_idx, end - key_states.shape[2] + i)
            first_kv.setdefault(slot, key_states[0, :, i].clone())
            last_kv[slot] = key_states[0, :, i].clone()
        return got

    cache.update = recording_update  # type: ignore[method-assign]
    token = torch.randint(1, 97, (1, 40))
    sizes = []
    with torch.no_grad():
        logits = model(token, past_key_values=cache).logits
        for step in range(400):
            token = logits[:, -1:].argmax(-1)
            logits = model(token, past_key_values=cache).logits
            assert logits.shape == (1, 1, 97)  # the new token only
            assert cache.retro is not None
            for layer, lay in zip(cache.retro.layers, cache.layers, strict=True):
                assert len(layer) == min(step + 1, window - 1)
                assert all(s.shape[-1] <= (window - 1) * k for s in layer.seen)
                assert lay.buf_k is not None and lay.buf_k.shape[2] == SMALL["sink_tokens"] + SMALL[
                    "window_tokens"] + SMALL["flush_tokens"]
            sizes.append(cache.retro.nbytes())
    assert max(sizes[100:]) == max(sizes[:100])  # bounded: reached within w-1 steps, then flat
    assert cache.retro.corrections > 0
    total = cache.get_seq_length()
    assert total == 40 + 400
    cache.flush()
    stored = client.fetch(cache.session_ids[0], 0, total)
    rerun_differs = 0
    for (layer, pos), k_last in last_kv.items():
        assert torch.equal(stored.keys[layer, :, pos], k_last), (layer, pos)
        rerun_differs += int(layer == 1 and pos >= 40 and not torch.equal(first_kv[(layer, pos)], k_last))
    assert rerun_differs > 100
    cache.close()


def test_config_and_misuse() -> None:
    with pytest.raises(ValueError, match="retro_window"):
        KVDConfig(retro=True, retro_window=1).validate()
    with pytest.raises(ValueError, match="retro_window"):
        KVDCache(LocalKvdClient(), retro=True, retro_window=9)
    with pytest.raises(ValueError, match="hold_tokens"):
        KVDConfig(retro=True, retro_window=4, hold_tokens=2).validate()
    with pytest.raises(ValueError, match="wave"):
        KVDCache(LocalKvdClient(), retro=True, index="wave")
    assert KVDCache(LocalKvdClient(), retro=True, retro_window=5, sink_tokens=SINK).config.hold_tokens == 4
    assert KVDCache(LocalKvdClient()).retro is None  # off by default
    # the retro steps need the hooks of enable() on the model that is called
    model = tiny_llama()
    kvd_transformers.enable(model)
    cache = KVDCache(LocalKvdClient(), retro=True, **SMALL)
    with torch.no_grad(), pytest.raises(RuntimeError, match="enable"):
        model.model(torch.randint(1, 97, (1, 8)), past_key_values=cache)


def test_request_leaves_out_bounds_that_exclude_nothing() -> None:
    """The past-query arguments: seen_from only when some entry's bound is below this call's range end (a flush
    since its step), one memoized tensor for all layers; at w = 2 the cached entry's seen ids as they are. The
    queries: the cached ones, then the new token's, float32 rows of the layer's buffer."""
    from kvd_transformers.retro import RetroLayer

    bounds: dict[tuple[int, ...], torch.Tensor] = {}
    layers = [RetroLayer(capacity=1), RetroLayer(capacity=1)]
    cached = torch.randn(2, 4, 1, 8, dtype=torch.bfloat16)
    for layer in layers:
        layer.begin(cached)
        layer.commit(np.random.randint(0, 100, (2, 1, 4, 5)), 100)
    got = layers[0].request(bounds, end=100)
    assert set(got) == {"past_in_queries", "past_seen_ids", "packed"}
    assert got["past_in_queries"] == 1
    assert got["past_seen_ids"].data_ptr() == layers[0].seen[0].ctypes.data  # the entry as it is
    new = torch.randn(2, 4, 1, 8, dtype=torch.bfloat16)
    queries = layers[0].begin(new).queries
    assert queries.dtype == torch.float32 and queries.shape == (2, 2, 4, 8)
    assert torch.equal(queries[:, 0], cached[:, :, 0].float()) and torch.equal(queries[:, 1], new[:, :, 0].float())
    flushed = [layer.request(bounds, end=132) for layer in layers]
    assert torch.equal(flushed[0]["past_seen_from"], torch.tensor([[100], [100]]))
    assert flushed[0]["past_seen_from"] is flushed[1]["past_seen_from"]  # shared by the layers
    assert "past_seen_from" in layers[0].request()  # no end given: always sent
    three = RetroLayer(capacity=2)
    for i in range(3):
        three.begin(torch.full((1, 4, 1, 8), float(i)))
        three.commit(np.random.randint(0, 100, (1, 1, 4, 3 + i)), 100 + 8 * i)
    assert len(three) == 2 and three.seen_from == [108, 116]
    queries = three.begin(torch.full((1, 4, 1, 8), 3.0)).queries
    assert torch.equal(queries[0, :, 0, 0], torch.tensor([1.0, 2.0, 3.0]))
    got = three.request(bounds, end=116)
    assert torch.equal(got["past_seen_from"], torch.tensor([[108, 116]]))
    assert got["past_seen_ids"].shape == (1, 2, 4, 5) and (got["past_seen_ids"][:, 0, :, 4:] == -1).all()
    assert torch.equal(got["past_seen_ids"][:, 1], torch.from_numpy(three.seen[1][:, 0]))


@pytest.mark.parametrize("capacity", [1, 3, 7])
def test_layer_rows_survive_the_buffer_wrapping_and_merge_in_place(capacity: int) -> None:
    """A layer's rows over many steps, against a plain list of every step's query, output and lse: each step
    sees its cached entries (the last `capacity` committed rows, oldest first) and its own new row, also after
    the cached rows moved to the front of the buffers; the in-place merge equals the out-of-place formula; a
    rewind (keep_newest) keeps the newest entries; the buffers never grow."""
    from kvd_transformers.retro import RetroLayer, RetroState

    layer, gen = RetroLayer(capacity=capacity), torch.Generator().manual_seed(5)
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # committed (query, out, lse) rows
    sizes = set()
    for step in range(60):
        if step == 40:  # a rewind: the two oldest entries go
            layer.keep_newest(max(0, len(layer) - 2))
            history = history[len(history) - len(layer):] if len(layer) else []
        count = len(layer)
        query = torch.randn(2, 4, 1, 8, generator=gen, dtype=torch.float64).to(torch.bfloat16)
        views = layer.begin(query)
        out_w = torch.randn(2, 1, 4, 8, generator=gen)
        lse_w = torch.randn(2, 1, 4, 1, generator=gen)
        base_out, base_lse = layer.put_window(views, out_w, lse_w)
        assert base_out.shape == (2, count + 1, 4, 8) and base_lse.shape == (2, count + 1, 4, 1)
        expect_q = torch.stack([q for q, _, _ in history[-count:]] + [query[:, :, 0].float()], dim=1) \
            if count else query[:, :, 0].float()[:, None]
        expect_out = torch.cat([o for _, o, _ in history[-count:]] + [out_w], dim=1) if count else out_w
        expect_lse = torch.cat([s for _, _, s in history[-count:]] + [lse_w], dim=1) if count else lse_w
        assert torch.equal(views.queries, expect_q) and torch.equal(views.first, expect_q[:, 0])
        assert torch.equal(base_out, expect_out) and torch.equal(base_lse, expect_lse)
        out_r = torch.randn(2, count + 1, 4, 8, generator=gen)
        lse_r = torch.randn(2, count + 1, 4, 1, generator=gen)
        lse_r[:, 0, 0] = float("-inf")  # nothing new for this row: it keeps its output
        merged, merged_lse = RetroState.merge(out_r, lse_r, (base_out, base_lse))
        assert merged.data_ptr() == base_out.data_ptr()  # in place
        assert torch.equal(merged, torch.lerp(expect_out, out_r, torch.sigmoid(lse_r - expect_lse)))
        # (on the CPU a strided logaddexp may take the scalar path: the last bit can differ)
        torch.testing.assert_close(merged_lse, torch.logaddexp(expect_lse, lse_r), rtol=1e-6, atol=1e-6)
        assert torch.equal(merged[:, 0, 0], expect_out[:, 0, 0])
        history += [(expect_q[:, i], merged[:, i:i + 1].clone(), merged_lse[:, i:i + 1].clone())
                    for i in range(count + 1)][count:]
        for i in range(count):  # the cached entries were corrected in place
            history[len(history) - 1 - count + i] = (expect_q[:, i], merged[:, i:i + 1].clone(),
                                                     merged_lse[:, i:i + 1].clone())
        layer.commit(np.zeros((2, 1, 4, 0), dtype=np.int64), step)
        assert len(layer) == min(capacity, len(history))
        history = history[len(history) - len(layer):]
        sizes.add(layer.nbytes() - sum(s.nbytes for s in layer.seen))
    assert len(sizes) == 1  # the buffers never grow
    with pytest.raises(RuntimeError, match="another shape"):
        layer.begin(torch.zeros(1, 4, 1, 8))


def test_past_inputs_write_seen_ids_and_write_bounds_only_when_they_change() -> None:
    """PastInputs writes a layer's seen ids into the plan every time, and its bounds only when they differ from
    what the plan holds (the layers mostly share them); NO_BOUND where none is below the range end."""
    from kvd_client.prepared import NO_BOUND
    from kvd_transformers.retro import PastInputs, RetroLayer

    class Plan:
        past = 1
        queries = torch.zeros(1, 2, 4, 8)
        seen_ids = torch.zeros(1, 1, 4, 5, dtype=torch.int64)
        seen_from = torch.zeros(1, 1, dtype=torch.int64)

        def slots(self) -> None:
            return None

    plan, bounds = Plan(), {}
    inputs = PastInputs(plan, plan.slots())
    layers = [RetroLayer(), RetroLayer()]
    for i, layer in enumerate(layers):
        layer.commit(np.full((1, 1, 4, 5), i), 100)
    inputs.write(layers[0], bounds, end=100)
    assert (plan.seen_ids == 0).all() and (plan.seen_from == NO_BOUND).all()
    plan.seen_from.fill_(-7)  # a later write with the same bounds leaves them alone
    inputs.write(layers[1], bounds, end=100)
    assert (plan.seen_ids == 1).all() and (plan.seen_from == -7).all()
    inputs.write(layers[1], bounds, end=132)  # a flush since: the bound excludes positions now
    assert (plan.seen_from == 100).all()
    inputs.write(layers[0], bounds, end=132)
    assert (plan.seen_ids == 0).all() and (plan.seen_from == 100).all()
    inputs.write(layers[0], bounds, end=100)
    assert (plan.seen_from == NO_BOUND).all()
