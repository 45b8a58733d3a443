"""Why the graph index misses a question's needle (issue 8): the trained model's question queries, per layer and
query head, against a GraphIndex built in-process the way kvd builds it (256 evenly spread prefill queries with
their exact top-100 keys as hints, offloaded keys = [sink 16, prompt end - window 64)).

    python bench/accuracy/graph_probe.py 16384 2 mqar              # per layer: share of needles found (top-1)
    python bench/accuracy/graph_probe.py 16384 2 mqar --top1-entries # + every prefill query's top-1 key as entry

For each missed sharp needle (softmax mass on the exact top-1 > 0.3) it prints the needle's in-degree in the
graph, how many hint lists hold it and the best rank (by q.k of the question query) of the keys linking to it.
Uses GraphIndex internals (_adj, _entries): an analysis tool, not an API user.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers.models.llama.modeling_llama as llama

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.accuracy import tasks  # noqa: E402
from bench.accuracy.model_def import load_model  # noqa: E402
from kvd.index.base import BuildHints, IndexShape  # noqa: E402
from kvd.index.graph import GraphIndex  # noqa: E402

SINK, WINDOW, K = 16, 64, 32


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("length", type=int)
    p.add_argument("items", type=int)
    p.add_argument("task", default="mqar")
    p.add_argument("--hint-samples", type=int, default=256)
    p.add_argument("--ef", type=int, default=512)
    p.add_argument("--top1-entries", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(2)
    model = load_model()
    cap: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    d = model.config.head_dim

    def hook(layer: int):  # the layer's post-RoPE queries and keys
        def f(mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            b, t, _ = h.shape
            q = mod.q_proj(h).view(b, t, -1, d).transpose(1, 2)
            k = mod.k_proj(h).view(b, t, -1, d).transpose(1, 2)
            cap[layer] = llama.apply_rotary_pos_emb(q, k, cos, sin)
        return f

    for i, lay in enumerate(model.model.layers):
        lay.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
    batch = tasks.make_batch(a.task, a.items, a.length, tasks.eval_generator(a.task, a.length, seed=0))
    with torch.no_grad():
        model(input_ids=batch.tokens)
    sep = batch.prompt_len
    qpos = [t - 1 for t in range(sep + 1, a.length) if batch.answer_mask[0, t]]  # queries that predict answers
    hq_n, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    g_size = hq_n // hkv
    shape = IndexShape(hkv, hq_n, d)
    even = torch.linspace(0, sep - 1, min(sep, a.hint_samples)).round().long()
    for layer in range(len(model.model.layers)):
        found, misses = [], []
        for i in range(a.items):
            q, k = (x[i].float() for x in cap[layer])
            keys = k[:, SINK:sep + 1 - WINDOW].contiguous()
            hint_q = q[:, even]
            topn = torch.stack([torch.topk(hint_q[h] @ keys[h // g_size].T, 100, dim=1).indices for h in range(hq_n)])
            idx = GraphIndex(shape, {})
            idx.build(keys, None, BuildHints(queries=hint_q, topn_ids=topn))
            if a.top1_entries:  # every prefill query's exact top-1 key (non-causal) becomes an entry point
                ents = []
                for g in range(hkv):
                    heads = q[g * g_size:(g + 1) * g_size, SINK:sep]
                    top1 = torch.cat([(qh @ keys[g].T).argmax(1) for qh in heads]).unique().numpy()
                    e = idx._entries[g]
                    ents.append(np.unique(np.concatenate([e[e >= 0], top1])))
                idx._entries = np.full((hkv, max(len(e) for e in ents)), -1, dtype=np.int64)
                for g, e in enumerate(ents):
                    idx._entries[g, :len(e)] = e
            adj = idx._adj
            for j in qpos:
                got = idx.search(q[:, j].contiguous(), K, d ** -0.5, params={"ef": str(a.ef)}).ids
                for h in range(hq_n):
                    g = h // g_size
                    s = keys[g] @ q[h, j]
                    t = int(s.argmax())
                    ok = t in set(got[h].tolist())
                    found.append(ok)
                    mass = float(torch.softmax(s * d ** -0.5, 0)[t])
                    if not ok and mass > 0.3:
                        linking = np.nonzero((adj[g] == t).any(1))[0]
                        rank = s.argsort(descending=True).argsort()
                        misses.append({"head": h, "p_top1": round(mass, 3), "in_degree": len(linking),
                                       "in_hint_lists": int((topn[g * g_size:(g + 1) * g_size] == t).sum()),
                                       "best_linking_rank": int(rank[linking].min()) if len(linking) else -1})
        print(json.dumps({"layer": layer, "needles_found": round(sum(found) / len(found), 3),
                          "entries": int((idx._entries >= 0).sum(1).max())}), flush=True)
        for m in misses:
            print("  missed", json.dumps(m), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
