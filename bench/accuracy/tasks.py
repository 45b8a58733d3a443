"""Synthetic long-context tasks for the accuracy model: generated in batches, vectorized, seeded.

Every item is one token sequence `[BOS, TASK, haystack ..., SEP, questions ...]`. The haystack is random filler
tokens with the task's facts placed at random (non-overlapping) spots; the questions come last and each answer
is predicted from the token just before it (teacher forcing: the questions region holds the answers too).

- mqar (multi-query associative recall): N pairs `key value` (distinct keys); questions `key value` for M of
  them in random order: at each question key the model must produce its value.
- passkey: the block `MARK d1 d2 d3 d4 d5` (5 distinct digits) once in the haystack; question `MARK d1..d5`:
  after MARK the model must copy the 5 digits (one answer = all 5 right).
- twohop: N chains `a -> b -> c` stored as two separate pairs `a b` and `b c` (a, b distinct keys, c a value)
  at unrelated places of the haystack; questions `a b c`: after `a` the model must produce b (first hop), after
  `b` the value c, found by a second lookup whose key is the first hop's answer (one answer = both right).
  Until 2026-11-22 the questions were `a c` (both hops inside one position's forward pass): no recipe got that
  off chance (BENCHMARKS.md, issue 8), so the first hop's answer is now written out (a chain of thought).

The depth of the passkey block can be fixed (needle-in-a-haystack grid). Vocabulary (384 ids): specials,
10 digits, 128 keys, 128 values, 96 filler tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, BOS, SEP, MARK = 0, 1, 2, 3
TASK_TOKEN = {"mqar": 4, "passkey": 5, "twohop": 6}
TASKS = tuple(TASK_TOKEN)
COPY = 7  # task token of the auxiliary copy sequences (training warm-up only)
DIGITS = (16, 26)
KEYS = (32, 160)
VALUES = (160, 288)
FILLER = (288, 384)
VOCAB_SIZE = 384
PASSKEY_DIGITS = 5
HEAD = 2  # BOS, TASK

# the facts and questions an item holds by default (training samples around these)
DEFAULT_PAIRS = {"mqar": 32, "twohop": 12}
DEFAULT_QUERIES = {"mqar": 8, "twohop": 4}
QUESTION_WIDTH = {"mqar": 2, "twohop": 3}  # tokens per question: `key value` / `a b c`


@dataclass
class Batch:
    """tokens [B, T]; answer_mask [B, T]: positions whose token is an answer token (predicted from t - 1);
    answer_id [B, T]: index of the answer (per row) each answer token belongs to, -1 elsewhere;
    prompt_len: positions [0, prompt_len) are the context (haystack), SEP sits at prompt_len."""

    task: str
    tokens: torch.Tensor
    answer_mask: torch.Tensor
    answer_id: torch.Tensor
    prompt_len: int
    num_answers: int

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.task, self.tokens.to(device), self.answer_mask.to(device), self.answer_id.to(device),
                     self.prompt_len, self.num_answers)


def question_len(task: str, queries: int | None = None) -> int:
    """Tokens of the questions region, SEP included."""
    if task == "passkey":
        return 2 + PASSKEY_DIGITS
    return 1 + QUESTION_WIDTH[task] * (queries or DEFAULT_QUERIES[task])


def _randint(lo: int, hi: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=gen, device=gen.device)


def _distinct(lo: int, hi: int, b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[b, n] distinct integers from [lo, hi) per row, in random order."""
    return torch.rand(b, hi - lo, generator=gen, device=gen.device).argsort(dim=1)[:, :n] + lo


def _block_starts(b: int, hay: int, n: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """[b, n] start positions of n non-overlapping blocks of `width` tokens inside the haystack
    [HEAD, HEAD + hay): distinct cells of a width-sized grid, shifted per row by a random offset."""
    cells = hay // width
    if cells < n:
        raise ValueError(f"a haystack of {hay} tokens cannot hold {n} blocks of {width}")
    cell = _distinct(0, cells, b, n, gen)
    shift = _randint(0, hay - cells * width + 1, (b, 1), gen)
    return HEAD + shift + cell * width


def make_batch(task: str, batch: int, length: int, gen: torch.Generator, *, pairs: int | None = None,
               queries: int | None = None, depth: float | None = None) -> Batch:
    """`batch` items of `length` tokens on the generator's device. pairs/queries: facts and questions
    (mqar, twohop); depth in [0, 1]: where the passkey block sits in the haystack (None: random)."""
    if task not in TASK_TOKEN:
        raise ValueError(f"unknown task {task!r}")
    dev = gen.device
    q_len = question_len(task, queries)
    hay = length - HEAD - q_len
    tokens = _randint(*FILLER, (batch, length), gen)
    tokens[:, 0] = BOS
    tokens[:, 1] = TASK_TOKEN[task]
    sep = HEAD + hay
    tokens[:, sep] = SEP
    answer_mask = torch.zeros(batch, length, dtype=torch.bool, device=dev)
    answer_id = torch.full((batch, length), -1, dtype=torch.long, device=dev)
    rows = torch.arange(batch, device=dev).unsqueeze(1)
    if task == "passkey":
        digits = _distinct(*DIGITS, batch, PASSKEY_DIGITS, gen)
        needle = torch.cat([torch.full((batch, 1), MARK, device=dev), digits], dim=1)  # [B, 6]
        width = needle.shape[1]
        if depth is None:
            start = HEAD + _randint(0, hay - width + 1, (batch, 1), gen)
        else:
            start = torch.full((batch, 1), HEAD + round(depth * (hay - width)), device=dev)
        tokens[rows, start + torch.arange(width, device=dev)] = needle
        tokens[:, sep + 1:sep + 1 + width] = needle
        answer_mask[:, sep + 2:sep + 1 + width] = True
        answer_id[:, sep + 2:sep + 1 + width] = 0
        return Batch(task, tokens, answer_mask, answer_id, sep, 1)

    n = pairs or DEFAULT_PAIRS[task]
    m = queries or DEFAULT_QUERIES[task]
    if m > n:
        raise ValueError("more questions than facts")
    if task == "mqar":
        first = _distinct(*KEYS, batch, n, gen)
        second = _randint(*VALUES, (batch, n), gen)
        question = [first, second]
    else:  # twohop: pairs (a, b) and (b, c); questions `a b c`
        keys = _distinct(*KEYS, batch, 2 * n, gen)
        a, b = keys[:, :n], keys[:, n:]
        c = _randint(*VALUES, (batch, n), gen)
        first, second = torch.cat([a, b], dim=1), torch.cat([b, c], dim=1)
        question = [a, b, c]
    starts = _block_starts(batch, hay, first.shape[1], 2, gen)
    tokens[rows, starts] = first
    tokens[rows, starts + 1] = second
    pick = _distinct(0, n, batch, m, gen)
    width = len(question)
    q_pos = sep + 1 + width * torch.arange(m, device=dev)
    for j, part in enumerate(question):
        tokens[:, q_pos + j] = torch.gather(part, 1, pick)
        if j:  # every token after the asked key is an answer token
            answer_mask[:, q_pos + j] = True
            answer_id[:, q_pos + j] = torch.arange(m, device=dev)
    return Batch(task, tokens, answer_mask, answer_id, sep, m)


def make_copy_batch(batch: int, length: int, gen: torch.Generator, variable: bool = False) -> Batch:
    """Auxiliary training sequences, a random segment s of answer-vocabulary tokens and its copy.

    fixed (H100 runs 1-2): `[BOS, COPY, s, SEP, s, filler]`, |s| = (length - 3) // 2, so the two copies are
    always |s| + 1 apart: run 1 learned it by that fixed offset (a positional head), not by content matching.
    variable (run 3's recipe, the committed weights in model/): |s| random in [4, 32] at a random place in filler, then
    `SEP s` at the end: the offset varies, so only content matching (induction) solves it; the MQAR lookup formed
    only with these in the mix (bench/accuracy/probe.py). Needs length >= 70. Every token of the second copy but
    its first is an answer."""
    dev = gen.device
    if variable:
        n = int(torch.randint(4, 33, (1,), generator=gen, device=dev))
        tokens = _randint(*FILLER, (batch, length), gen)
        seg = _randint(DIGITS[0], VALUES[1], (batch, n), gen)
        sep = length - n - 1
        start = HEAD + _randint(0, sep - HEAD - n + 1, (batch, 1), gen)
        rows = torch.arange(batch, device=dev).unsqueeze(1)
        tokens[:, 0], tokens[:, 1] = BOS, COPY
        tokens[rows, start + torch.arange(n, device=dev)] = seg
        tokens[:, sep] = SEP
        tokens[:, sep + 1:] = seg
    else:  # draws in the committed run's order
        n = (length - HEAD - 1) // 2
        seg = _randint(DIGITS[0], VALUES[1], (batch, n), gen)
        sep = HEAD + n
        tokens = torch.cat([torch.tensor([BOS, COPY], device=dev).expand(batch, 2), seg,
                            torch.full((batch, 1), SEP, device=dev), seg], dim=1)
        tokens = torch.cat([tokens, _randint(*FILLER, (batch, length - tokens.shape[1]), gen)], dim=1)
    answer_mask = torch.zeros(batch, length, dtype=torch.bool, device=dev)
    answer_mask[:, sep + 2:sep + 1 + n] = True
    answer_id = torch.where(answer_mask, torch.arange(length, device=dev), -1)
    return Batch("copy", tokens, answer_mask, answer_id, sep, length)


def eval_generator(task: str, length: int, seed: int, salt: int = 0) -> torch.Generator:
    """The CPU generator of an evaluation set: fixed by (task, length, seed, salt), disjoint from training
    (which seeds its own generator on the training device)."""
    code = TASKS.index(task) + 1
    return torch.Generator().manual_seed(1_000_003 * seed + 7919 * length + 104_729 * code + 13 * salt + 5)


def answers_correct(pred: torch.Tensor, batch: Batch) -> torch.Tensor:
    """pred [B, T]: the model's token at every position (pred[:, t] predicted from position t - 1).
    -> bool [B, num_answers]: every token of the answer right."""
    wrong = (pred != batch.tokens) & batch.answer_mask
    ids = batch.answer_id.clamp(min=0)
    bad = torch.zeros(batch.tokens.shape[0], batch.num_answers, dtype=torch.long, device=pred.device)
    bad.scatter_add_(1, ids, (wrong & (batch.answer_id >= 0)).long())
    return bad == 0
