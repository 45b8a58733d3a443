"""Train the accuracy model (bench/accuracy/model/) on the synthetic tasks of tasks.py.

    python bench/accuracy/train.py                       # GPU: run 3's recipe (~5 min, H100)
    python bench/accuracy/train.py --cpu-smoke           # a tiny run on the CPU (checks the script)

Status (BENCHMARKS.md, issue 8): the committed weights (bench/accuracy/model/, run 4) solve MQAR, passkey and
two-hop (100% at 2048 tokens, 512 items each, and at 16384): run 3 (this recipe from a random initialization,
299 s on the H100: MQAR and passkey, two-hop at chance in its old one-step format `a c`) then 59 s of
    python bench/accuracy/train.py --init <run 3's weights> --lr 5e-4 --warmup 50 --ramp-steps 300 \
        --ramp-until-loss 0 --grow-steps 300 --decay-at-minutes 2.5 --decay-steps 300 --target 0.995
with two-hop's questions as `a b c` (the first hop's answer written out, tasks.py): 358 s of training in all.
Runs 1-2 (the older recipe) learned passkey only: MQAR stayed on its plateau because (a) the curriculum asked
every fact, so the last questions could be answered by elimination (the value not asked yet), a shortcut the
models took instead of the lookup, and (b) the copy sequences had a fixed offset (a positional shortcut).
Probes (bench/accuracy/probe.py) showed the lookup circuit forming after ~1000-3000 steps of short sequences
once both shortcuts were gone, and not at all without the variable-offset copy sequences.

Recipe: a 6-layer Llama (hidden 256, 4 query heads over 2 KV heads of dim 64, RoPE theta 1e5), AdamW (lr 1e-3),
bf16 autocast, loss on answer tokens only (the mean of the tasks' means). Each step mixes the tasks equally at
one sequence length and a fixed token budget, in one forward. Curriculum: the ramp (at least --ramp-steps, and
on while the mqar loss is above --ramp-until-loss, at most --ramp-max-steps) is 128-token sequences with few
facts plus auxiliary copy sequences at a random offset (they form the induction heads the lookup builds on);
then --grow-steps of medium lengths while the facts grow, then lengths up to the training length with up to
64 mqar pairs / 24 twohop chains. A quarter to half of the facts are asked. Learning rate: warmup, constant,
then a linear decay that starts when the periodic evaluation reaches --target on every task (or at the step /
wall-clock budget) and ends the run.
Length generalization: after the ramp, most sequences get PoSE-style position ids (two random cut points with
random skips, so that relative distances span up to --max-position): evaluating up to 8x the training length
needs no RoPE scaling. Seeded: same seed, same data and initialization (GPU kernels are not bitwise
deterministic, and the wall-clock budget and the loss-driven ramp end can move; training_log.json's
"reproduce" pins both).
Writes config.json + model.safetensors (float16) + training_log.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from bench.accuracy import tasks  # noqa: E402
from bench.accuracy.model_def import MODEL_DIR, llama_config, load_model, save_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=2048, help="training sequence length")
    p.add_argument("--max-position", type=int, default=16384, help="largest position id seen in training")
    p.add_argument("--steps", type=int, default=6000, help="most steps (the decay phase included)")
    p.add_argument("--ramp-steps", type=int, default=600, help="short-sequence phase (steps, at least)")
    p.add_argument("--ramp-until-loss", type=float, default=0.3,
                   help="the ramp goes on (up to --ramp-max-steps) until the mqar answer loss (mean of the last "
                        "50 steps) is below this: the retrieval circuit has formed (0 = exactly --ramp-steps)")
    p.add_argument("--ramp-max-steps", type=int, default=3000)
    p.add_argument("--grow-steps", type=int, default=600, help="medium lengths while the facts grow (steps)")
    p.add_argument("--decay-steps", type=int, default=400)
    p.add_argument("--target", type=float, default=2.0, help="periodic accuracy (training length, every task) "
                                                             "that starts the final decay (default: never)")
    p.add_argument("--decay-at-minutes", type=float, default=4.5, help="wall clock that starts the decay")
    p.add_argument("--tokens-per-step", type=int, default=98304)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--copy-offset", choices=["fixed", "variable"], default="variable",
                   help="auxiliary copy sequences of the ramp (tasks.make_copy_batch); 'fixed' is runs 1-2's")
    p.add_argument("--pose", type=float, default=0.75, help="fraction of sequences with skipped positions")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--rope-theta", type=float, default=100000.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-items", type=int, default=128, help="items per task of the periodic evaluation")
    p.add_argument("--eval-long", type=int, default=8, help="periodic evaluation also at this multiple of the "
                                                            "training length (32 items per task; 0 = off)")
    p.add_argument("--final-items", type=int, default=512, help="items per task of the final evaluation")
    p.add_argument("--out", default=None, help="output folder (default: $OUT/model if OUT is set, else "
                                               "bench/accuracy/model)")
    p.add_argument("--init", default=None, help="start from these weights (a model folder, e.g. "
                                                "bench/accuracy/model) instead of a random initialization; "
                                                "its training_log.json is kept in the new log under 'init'")
    p.add_argument("--cpu-smoke", action="store_true")
    return p.parse_args(argv)


def curriculum(step: int, args: argparse.Namespace, gen: torch.Generator
               ) -> tuple[int, dict[str, tuple[int, int]]]:
    """Sequence length and (facts, questions) per task of a step. During the ramp (the first --ramp-steps, longer
    while the circuits have not formed: main()): 128-token sequences with few facts (mqar 8-16 pairs, twohop
    4-6 chains), where the retrieval circuits form; then --grow-steps of 256 to length/2 tokens while the facts
    grow; then mostly the full training length with up to 64 mqar pairs / 24 twohop chains. A quarter to half of
    the facts are asked: asking every fact let the last questions be answered by elimination (the value not
    asked yet), a shortcut that held the models on their plateau (issue 8)."""
    length, ramp = args.length, max(1, args.ramp_steps)
    if step < ramp:
        choices = [128]
    elif step < ramp + args.grow_steps:
        choices = [256, 512, length // 4, length // 2]
    else:
        choices = [length // 4, length // 2, length, length]
    t = min(length, max(128, choices[int(torch.randint(len(choices), (1,), generator=gen))]))
    grow = min(1.0, max(0, step - ramp) / max(1, args.grow_steps))
    counts = {}
    for task, lo, start, top, tokens_per_fact in (("mqar", 8, 16, 64, 2), ("twohop", 4, 6, 24, 4)):
        hi = round(start + (top - start) * grow)
        hi = min(hi, (t - tasks.HEAD - 1) // (tokens_per_fact + 1))  # room for every fact and the questions
        n = int(torch.randint(min(lo, hi), hi + 1, (1,), generator=gen))
        m = int(torch.randint(max(1, n // 4), max(1, n // 2) + 1, (1,), generator=gen))
        counts[task] = (n, m)
    return t, counts


def pose_positions(b: int, t: int, sep: int, max_position: int, frac: float, gen: torch.Generator) -> torch.Tensor:
    """[b, t] increasing position ids: contiguous, except for a fraction `frac` of rows that jump forward at two
    random cut points inside the haystack by random amounts summing to at most max_position - t."""
    dev = gen.device
    base = torch.arange(t, device=dev).expand(b, t)
    room = max(0, max_position - t)
    use = torch.rand(b, generator=gen, device=dev) < frac
    total = (torch.rand(b, generator=gen, device=dev) * (room + 1)).long().clamp(max=room) * use
    first = (total * torch.rand(b, generator=gen, device=dev)).long()
    cuts = torch.randint(tasks.HEAD, sep, (b, 2), generator=gen, device=dev).sort(dim=1).values
    jump = first[:, None] * (base >= cuts[:, :1]) + (total - first)[:, None] * (base >= cuts[:, 1:])
    return base + jump


def sample_step(step: int, args: argparse.Namespace, gen: torch.Generator, cpu_gen: torch.Generator
                ) -> list[tuple[tasks.Batch, torch.Tensor]]:
    """The step's batches (one per task, plus copy sequences during the ramp) with their position ids."""
    length, counts = curriculum(step, args, cpu_gen)
    names = [*tasks.TASKS, "copy"] if step < args.ramp_steps else list(tasks.TASKS)
    per_task = max(1, args.tokens_per_step // length // len(names))
    out = []
    for task in names:
        if task == "copy":
            batch = tasks.make_copy_batch(per_task, length, gen, variable=args.copy_offset == "variable")
        else:
            n, m = counts.get(task, (None, None))
            batch = tasks.make_batch(task, per_task, length, gen, pairs=n, queries=m)
        # PoSE only after the ramp: position jumps slow the forming of the circuits a lot (measured)
        pose = args.pose if step >= args.ramp_steps else 0.0
        out.append((batch, pose_positions(per_task, length, batch.prompt_len, args.max_position, pose, gen)))
    return out


def answer_loss(model: LlamaForCausalLM, batch: tasks.Batch, positions: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the answer tokens only (the LM head runs on those positions alone)."""
    return task_losses(model, [(batch, positions)])[0]


def task_losses(model: LlamaForCausalLM, parts: list[tuple[tasks.Batch, torch.Tensor | None]]) -> torch.Tensor:
    """Mean answer cross-entropy of each part, all parts (same length) in one forward: [len(parts)]."""
    tokens = torch.cat([b.tokens for b, _ in parts])
    answer_mask = torch.cat([b.answer_mask for b, _ in parts])
    part_of = torch.cat([torch.full((b.tokens.shape[0],), i, device=tokens.device) for i, (b, _) in enumerate(parts)])
    positions = None
    if any(p is not None for _, p in parts):
        positions = torch.cat([p if p is not None else torch.arange(b.tokens.shape[1], device=tokens.device).expand(
            b.tokens.shape[0], -1) for b, p in parts])
    ones = torch.ones_like(tokens)  # an explicit mask keeps transformers from reading position jumps as packing
    hidden = model.model(input_ids=tokens, attention_mask=ones, position_ids=positions).last_hidden_state
    rows, cols = answer_mask.nonzero(as_tuple=True)
    ce = torch.nn.functional.cross_entropy(model.lm_head(hidden[rows, cols - 1]).float(), tokens[rows, cols],
                                           reduction="none")
    owner = part_of[rows]
    sums = torch.zeros(len(parts), device=tokens.device).index_add_(0, owner, ce)
    counts = torch.zeros(len(parts), device=tokens.device).index_add_(0, owner, torch.ones_like(ce))
    return sums / counts.clamp(min=1)


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, task: str, items: int, length: int, device: torch.device, seed: int = 0,
             chunk: int = 32) -> float:
    """Answer accuracy (all tokens of an answer right) with full attention, contiguous positions."""
    model.eval()
    gen = tasks.eval_generator(task, length, seed)
    good = total = 0
    for start in range(0, items, chunk):
        batch = tasks.make_batch(task, min(chunk, items - start), length, gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model.model(input_ids=batch.tokens).last_hidden_state
            pred = torch.zeros_like(batch.tokens)
            rows, cols = batch.answer_mask.nonzero(as_tuple=True)
            pred[rows, cols] = model.lm_head(hidden[rows, cols - 1]).argmax(-1)
        ok = tasks.answers_correct(pred, batch)
        good += int(ok.sum())
        total += ok.numel()
    model.train()
    return good / max(1, total)


class Schedule:
    """Warmup, a constant learning rate, then a linear decay of --decay-steps to min_lr_ratio x lr, started by
    whichever comes first: the periodic evaluation reaching --target on every task, the step budget
    (--steps - --decay-steps), or the wall-clock budget (--decay-at-minutes). Training ends with the decay."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.decay_from: int | None = None
        self.reason = ""

    def start_decay(self, step: int, reason: str) -> None:
        if self.decay_from is None:
            self.decay_from, self.reason = step, reason

    def lr(self, step: int) -> float:
        a = self.args
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        if self.decay_from is None:
            return a.lr
        f = min(1.0, (step - self.decay_from) / max(1, a.decay_steps))
        return a.lr * (1 - (1 - a.min_lr_ratio) * f)

    def done(self, step: int) -> bool:
        return self.decay_from is not None and step >= self.decay_from + self.args.decay_steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        args.length, args.max_position, args.steps, args.ramp_steps = 256, 2048, min(args.steps, 60), 30
        args.tokens_per_step, args.eval_every, args.eval_items, args.final_items = 6144, 30, 16, 32
        args.layers, args.hidden, args.intermediate, args.decay_steps, args.warmup = 2, 64, 128, 20, 10
        args.eval_long, args.ramp_until_loss, args.grow_steps = 2, 0.0, 10
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    out = Path(args.out or (Path(os.environ["OUT"]) / "model" if os.environ.get("OUT") else MODEL_DIR))
    torch.manual_seed(args.seed)
    cfg = llama_config(args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate, args.max_position,
                       args.rope_theta)
    model = LlamaForCausalLM(cfg).to(device).train()
    init_log = None
    if args.init:  # the config must match (same --layers/--hidden/...): load_state_dict is strict
        model.load_state_dict(load_model(args.init, device).state_dict())
        model.train()
        init_path = Path(args.init) / "training_log.json"
        if init_path.exists():
            init_log = json.loads(init_path.read_text())
            init_log.pop("losses", None)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    cpu_gen = torch.Generator().manual_seed(args.seed + 2)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "params": params}
    print(json.dumps(env), flush=True)
    log: dict[str, Any] = {"recipe": dict(vars(args)), "env": env, "config": cfg.to_dict(), "evals": [], "losses": []}
    if init_log is not None:
        log["init"] = init_log
    sched = Schedule(args)
    t0 = time.perf_counter()
    task_loss: dict[str, Any] = {}
    task_n: dict[str, int] = {}
    recent: list[float] = []
    step = 0
    for step in range(args.steps):
        if step >= args.steps - args.decay_steps:
            sched.start_decay(step, "step budget")
        elif time.perf_counter() - t0 > 60 * args.decay_at_minutes:
            sched.start_decay(step, "wall-clock budget")
        if sched.done(step):
            break
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
        parts = sample_step(step, args, gen, cpu_gen)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = task_losses(model, parts)  # one forward for all tasks (they share the step's length)
            loss = losses.mean()
        loss.backward()
        for (batch, _), part in zip(parts, losses.detach(), strict=True):
            task_loss[batch.task] = task_loss.get(batch.task, 0.0) + part
            task_n[batch.task] = task_n.get(batch.task, 0) + 1
        if step < args.ramp_steps and args.ramp_until_loss > 0:
            recent.append(float(losses[tasks.TASKS.index("mqar")]))
            # the ramp ends once the lookup circuit has formed (mqar loss drops sharply) or at --ramp-max-steps
            if (step + 1 == args.ramp_steps and step + 1 < args.ramp_max_steps
                    and sum(recent[-50:]) / len(recent[-50:]) >= args.ramp_until_loss):
                args.ramp_steps += 50
        if step + 1 == args.ramp_steps:
            log["ramp_end"] = step + 1
            print(f"ramp ends at step {step + 1}", file=sys.stderr, flush=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            elapsed = time.perf_counter() - t0
            means = {t: round(float(v) / task_n[t], 4) for t, v in task_loss.items()}
            log["losses"].append({"step": step + 1, "s": round(elapsed, 1), "lr": sched.lr(step), **means})
            print(f"step {step + 1}/{args.steps} loss {means} len {parts[0][0].tokens.shape[1]} "
                  f"lr {sched.lr(step):.2e} {elapsed:.0f}s", file=sys.stderr, flush=True)
            task_loss, task_n = {}, {}
        if (step + 1) % args.eval_every == 0:
            accs = {t: round(accuracy(model, t, args.eval_items, args.length, device), 4) for t in tasks.TASKS}
            entry = {"step": step + 1, "s": round(time.perf_counter() - t0, 1), **accs}
            if args.eval_long:
                long = args.eval_long * args.length
                entry[f"at_{long}"] = {t: round(accuracy(model, t, 32, long, device, chunk=8), 4) for t in tasks.TASKS}
            log["evals"].append(entry)
            print(json.dumps(log["evals"][-1]), flush=True)
            if step + 1 >= args.ramp_steps and min(accs.values()) >= args.target:
                sched.start_decay(step + 1, f"target {args.target} reached")
    log["steps_done"] = step
    log["decay"] = {"from_step": sched.decay_from, "reason": sched.reason}
    log["train_s"] = round(time.perf_counter() - t0, 1)
    if init_log is not None:  # training time from a random initialization, this run and its --init chain
        log["train_s_total"] = round(log["train_s"] + init_log.get("train_s_total", init_log.get("train_s", 0)), 1)
    save_model(model, out)
    # the final figures are measured on the saved (float16) weights, as every later user loads them
    saved = load_model(out, device)
    log["final"] = {t: accuracy(saved, t, args.final_items, args.length, device, seed=1) for t in tasks.TASKS}
    log["final_items_per_task"] = args.final_items
    log["reproduce"] = (f"--ramp-steps {log.get('ramp_end', args.ramp_steps)} --ramp-until-loss 0 --steps "
                        f"{log['steps_done']} --decay-steps {args.decay_steps} --decay-at-minutes 1e9 (the ramp "
                        "ends and the decay starts at the same steps whatever the machine's speed)")
    log["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({"final": log["final"], "steps": log["steps_done"], "train_s": log["train_s"],
                      "decay": log["decay"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
