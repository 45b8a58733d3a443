"""Launch-ahead on a real CUDA device: the logits equal the blocking path's (KVDConfig.launch_ahead off) through a
prefill and teacher-forced decode steps, batch 1 and 2, with a small k so that the retrieved part matters; plain
decode steps and RetroAttention's steps (w = 2 and 3: corrections happen, and their count must agree too).

CI has no GPU; tests/test_launch_ahead.py runs the same path on the CPU with a host stand-in for the stream wait.
This script checks the CUDA pieces themselves (the registered region, cuStreamWaitValue32, the asynchronous
copies). Prints a table last and writes JSON (--out).

    python3 -m bench.launch_ahead_check --out bench/results/launch_ahead_check_h100.json
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

import kvd_transformers
import torch
import transformers
from kvd_client import KvdClient
from kvd_transformers import KVDCache
from kvd_transformers.launch_ahead import stream_waiter

from bench.daemon import Daemon


def tiny_llama(device: torch.device) -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=211,
                                   max_position_embeddings=4096, pad_token_id=0, bos_token_id=None,
                                   eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval().to(device)
    with torch.no_grad():  # sharper attention, as in a trained model
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    kvd_transformers.enable(model)
    return model


def decode(model: Any, cache: KVDCache, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    with torch.no_grad():
        out = [model(ids[:, :prompt], past_key_values=cache).logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(out, dim=1).float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--retro-windows", default="2,3", help="RetroAttention windows checked too ('' for none)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device("cuda")
    assert stream_waiter() is not None, "no cuStreamWaitValue32 on this driver"
    model = tiny_llama(device)
    daemon = Daemon()
    client = KvdClient(daemon.target)
    rows = []
    try:
        windows = [int(w) for w in args.retro_windows.split(",") if w]
        for window, batch in [(0, 1), (0, 2)] + [(w, b) for w in windows for b in (1, 2)]:
            ids = torch.randint(1, 211, (batch, args.prompt + args.steps), generator=torch.Generator().manual_seed(1))
            ids = ids.to(device)
            logits, stats = {}, {}
            for ahead in (False, True):
                retro = {"retro": True, "retro_window": window} if window else {}
                cache = KVDCache(client, session=[f"check-{uuid.uuid4().hex[:8]}" for _ in range(batch)],
                                 sink_tokens=16, window_tokens=64, flush_tokens=16, top_k=8, index="flat",
                                 launch_ahead=ahead, **retro)
                started = time.perf_counter()
                logits[ahead] = decode(model, cache, ids, args.prompt)
                corrections = cache.retro.corrections if cache.retro is not None else 0
                stats[ahead] = (cache.stats.ahead_runs, cache.stats.retrieve_calls, time.perf_counter() - started,
                                corrections)
                cache.close()
            dense = decode(model, transformers.DynamicCache(), ids, args.prompt)
            rows.append({"mode": f"retro w={window}" if window else "plain", "batch": batch,
                         "equal": bool(torch.equal(logits[True], logits[False])) and stats[True][3] == stats[False][3],
                         "max_abs_diff": float((logits[True] - logits[False]).abs().max()),
                         "corrections": [stats[False][3], stats[True][3]],
                         "ahead_runs": stats[True][0], "retrieve_calls": stats[True][1],
                         "max_abs_diff_vs_full_attention": float((logits[True] - dense).abs().max()),
                         "seconds_blocking": round(stats[False][2], 2), "seconds_ahead": round(stats[True][2], 2)})
    finally:
        client.close()
        daemon.stop()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "prompt": args.prompt, "steps": args.steps, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print("mode | batch | launch-ahead logits == blocking | max |diff| | corrections (blocking, ahead) | "
          "ahead runs / calls | vs full attention")
    for r in rows:
        print(f"{r['mode']} | {r['batch']} | {r['equal']} | {r['max_abs_diff']:.3g} | {r['corrections']} | "
              f"{r['ahead_runs']} / {r['retrieve_calls']} | {r['max_abs_diff_vs_full_attention']:.3g}")
    if not all(r["equal"] and r["ahead_runs"] > 0 for r in rows) or any(
            r["corrections"][1] == 0 for r in rows if r["mode"] != "plain"):
        raise SystemExit("launch-ahead changed the logits or never ran")


if __name__ == "__main__":
    main()
