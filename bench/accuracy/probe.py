"""Recipe probes for the accuracy model: several small trainings side by side on one GPU (or the CPU), each
printing its answer accuracy as it goes, to find where the retrieval circuits form (issue 8).

    python bench/accuracy/probe.py --minutes 4 --only A,B     # named configs of CONFIGS, in parallel
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import LlamaForCausalLM  # noqa: E402

from bench.accuracy import tasks  # noqa: E402
from bench.accuracy.model_def import llama_config  # noqa: E402
from bench.accuracy.train import task_losses  # noqa: E402

# name: layers, hidden, heads, kv, lr, wd, batch, length, mix (task:pairs:queries, ...)
CONFIGS = {
    "A": dict(layers=2, hidden=128, heads=2, kv=1, lr=1e-3, wd=0.0, batch=256, length=64, mix="mqar:8:4"),
    "B": dict(layers=2, hidden=128, heads=2, kv=1, lr=3e-3, wd=0.0, batch=256, length=64, mix="mqar:8:4"),
    "C": dict(layers=4, hidden=256, heads=4, kv=2, lr=1e-3, wd=0.0, batch=256, length=128, mix="mqar:16:8"),
    "D": dict(layers=6, hidden=256, heads=4, kv=2, lr=1e-3, wd=0.1, batch=256, length=128,
              mix="mqar:16:8,twohop:6:3,passkey:0:0,copy:0:0"),
    "E": dict(layers=6, hidden=256, heads=4, kv=2, lr=1e-3, wd=0.0, batch=256, length=128, mix="mqar:16:8"),
    "F": dict(layers=2, hidden=128, heads=2, kv=1, lr=1e-3, wd=0.0, batch=256, length=128, mix="mqar:8:4,copy:0:0"),
    "G": dict(layers=4, hidden=256, heads=4, kv=2, lr=1e-3, wd=0.0, batch=256, length=128, mix="twohop:6:3"),
    "I": dict(layers=2, hidden=128, heads=2, kv=1, lr=1e-3, wd=0.0, batch=256, length=32, mix="mqar:4:2"),
    "T1": dict(layers=6, hidden=256, heads=4, kv=2, lr=1e-3, wd=0.1, batch=320, length=128,
               mix="mqar:16:8,twohop:4:2,twohop:4:2,copy:0:0,passkey:0:0"),
    "T2": dict(layers=8, hidden=256, heads=4, kv=2, lr=1e-3, wd=0.1, batch=320, length=128,
               mix="mqar:16:8,twohop:4:2,twohop:4:2,copy:0:0,passkey:0:0"),
    "T3": dict(layers=6, hidden=256, heads=4, kv=2, lr=2e-3, wd=0.1, batch=320, length=128,
               mix="mqar:16:8,twohop:4:2,twohop:4:2,copy:0:0,passkey:0:0"),
    "T4": dict(layers=6, hidden=256, heads=4, kv=2, lr=1e-3, wd=0.1, batch=320, length=128,
               mix="mqar:8:4,twohop:2:1,twohop:3:2,copy:0:0,passkey:0:0"),
    "T5": dict(layers=6, hidden=256, heads=4, kv=2, lr=1e-3, wd=0.0, batch=256, length=128,
               mix="mqar:16:8,twohop:6:3,copy:0:0,passkey:0:0"),
    "T6": dict(layers=6, hidden=384, heads=6, kv=2, lr=1e-3, wd=0.1, batch=320, length=128, inter=768,
               mix="mqar:16:8,twohop:4:2,twohop:4:2,copy:0:0,passkey:0:0"),
    "H": dict(layers=6, hidden=256, heads=4, kv=2, lr=3e-3, wd=0.0, batch=256, length=128, mix="mqar:16:8"),
}


def batch_of(task: str, n: int, m: int, size: int, length: int, gen: torch.Generator) -> tasks.Batch:
    if task == "copy":
        return tasks.make_copy_batch(size, length, gen, variable=True)
    if task == "passkey":
        return tasks.make_batch(task, size, length, gen)
    return tasks.make_batch(task, size, length, gen, pairs=n, queries=m)


def run_one(name: str, cfg: dict, seconds: float, device: torch.device, a_every: int = 250) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(cfg["layers"], cfg["hidden"], cfg["heads"], cfg["kv"],
                                          cfg.get("inter", 3 * cfg["hidden"]), 4096)).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["wd"]}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95))
    mix = [(t, int(n), int(m)) for t, n, m in (x.split(":") for x in cfg["mix"].split(","))]
    gen = torch.Generator(device=device).manual_seed(1)
    per = cfg["batch"] // len(mix)
    t0 = time.perf_counter()
    step = 0
    while time.perf_counter() - t0 < seconds:
        for g in opt.param_groups:
            g["lr"] = cfg["lr"] * min(1.0, (step + 1) / 100)
        parts = [(batch_of(t, n, m, per, cfg["length"], gen), None) for t, n, m in mix]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = task_losses(model, parts)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % a_every == 0:
            accs = {}
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                egen = torch.Generator(device=device).manual_seed(99)
                for t, n, m in mix:
                    if t == "copy":
                        continue
                    b = batch_of(t, n, m, 256, cfg["length"], egen)
                    pred = model(input_ids=b.tokens).logits.argmax(-1)
                    pred = torch.cat([pred[:, :1], pred[:, :-1]], 1)
                    accs[t] = round(tasks.answers_correct(pred, b).float().mean().item(), 3)
            model.train()
            print(json.dumps({"cfg": name, "step": step, "s": round(time.perf_counter() - t0),
                              "loss": [round(x, 3) for x in losses.tolist()], "acc": accs}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--only", default=",".join(CONFIGS))
    p.add_argument("--config", default=None, help="run this one config here (the launcher's child)")
    p.add_argument("--json", default=None, help="an extra config as JSON (name=json)")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.config:
        cfg = CONFIGS.get(a.config) or json.loads(a.json)
        run_one(a.config, cfg, a.minutes * 60, device)
        return 0
    procs = [subprocess.Popen([sys.executable, __file__, "--minutes", str(a.minutes), "--config", name],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for name in a.only.split(",")]
    return max(pr.wait() for pr in procs)


if __name__ == "__main__":
    raise SystemExit(main())
