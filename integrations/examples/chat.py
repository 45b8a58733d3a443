"""Multi-turn chat over a kvd session with a randomly initialised Llama (no download).

Each turn sends the whole history to `generate`, but only the new message is computed: the earlier turns'
K/V come back from kvd (the sink and the recent window onto the device, the rest answered by kvd's
retrieval). Run it twice with the same --session and the second run continues the first conversation, even
after restarting the daemon (the session is persisted after every turn when the daemon has a disk tier).

    kvd serve &                                             # or: make run
    python integrations/examples/chat.py --session demo --turns "Hello" "Tell me more"
    python integrations/examples/chat.py --session demo --turns "And then?"    # continues "demo"
    python integrations/examples/chat.py --session demo --interactive
    python integrations/examples/chat.py --gpu --session big ...               # Llama-3-8B-shaped, bf16

The model is random, so replies are noise; the tokenizer is plain UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

try:
    import kvd_transformers
    from kvd_client import FailedPreconditionError, KvdClient
except ImportError:  # running from a source checkout without an install
    root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(root), str(root / "client"), str(root / "integrations" / "transformers")]
    import kvd_transformers
    from kvd_client import FailedPreconditionError, KvdClient

from kvd_transformers import KVDCache


def build_model(gpu: bool) -> tuple[LlamaForCausalLM, torch.device]:
    if gpu:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=1 << 20,
                          rope_theta=500000.0)
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=1 << 16)
        device, dtype = torch.device("cpu"), torch.float32
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # a random model would stop at random places
    return model, device


def encode(text: str) -> torch.Tensor:
    return torch.tensor([list(text.encode())], dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    return bytes(int(t) % 256 for t in ids.reshape(-1).tolist()).decode(errors="replace")


def messages(args: argparse.Namespace) -> Iterator[str]:
    yield from args.turns
    if args.interactive:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                return
            if line.strip():
                yield line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=None, help="kvd address (default: $KVD_TARGET or the default socket)")
    p.add_argument("--session", default="chat-demo")
    p.add_argument("--turns", nargs="*", default=["Hello, who are you?", "What did I just ask?"])
    p.add_argument("--interactive", action="store_true", help="then read more messages from stdin")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.8) instead of greedy")
    p.add_argument("--gpu", action="store_true", help="Llama-3-8B-shaped bf16 model on the GPU")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--sink", type=int, default=None, help="default: 16 on CPU, 128 on GPU")
    p.add_argument("--window", type=int, default=None, help="default: 64 on CPU, 512 on GPU")
    p.add_argument("--fresh", action="store_true", help="delete the session first")
    args = p.parse_args(argv)

    model, device = build_model(args.gpu)
    kvd_transformers.enable(model)
    client = KvdClient(args.target)
    sink = args.sink if args.sink is not None else (128 if args.gpu else 16)
    window = args.window if args.window is not None else (512 if args.gpu else 64)
    if args.fresh:
        try:
            client.delete_session(args.session)
        except Exception as exc:
            print(f"(nothing to delete: {exc})")

    cache = KVDCache(client, session=args.session, sink_tokens=sink, window_tokens=window, top_k=args.top_k,
                     flush_tokens=min(32, window))
    history = torch.zeros(1, 0, dtype=torch.long)
    if cache.get_seq_length():
        stored = cache.history()
        if stored is None:
            raise SystemExit(f"session {args.session!r} has no token ids stored; start with --fresh")
        history = stored.view(1, -1)
        print(f"[continuing session {args.session!r}: {history.shape[1]} tokens in kvd]")

    for text in messages(args):
        prompt = torch.cat([history, encode(f"\nUser: {text}\nAssistant:")], dim=1)
        cache.check_history(prompt)
        reused = cache.get_seq_length()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt.to(device), attention_mask=torch.ones_like(prompt).to(device),
                                 past_key_values=cache, max_new_tokens=args.max_new_tokens,
                                 do_sample=args.sample, temperature=0.8 if args.sample else None)
        elapsed = time.perf_counter() - t0
        reply = out[0, prompt.shape[1]:].cpu()
        history = out[:, :].cpu()
        try:
            cache.persist()
            durable = "persisted"
        except FailedPreconditionError:
            cache.flush()
            durable = "in memory only (the daemon has no disk tier)"
        print(f"assistant> {decode(reply)!r}")
        print(f"  [{reused} tokens reused from kvd, {prompt.shape[1] - reused} computed, "
              f"{reply.numel()} generated in {elapsed:.2f}s; session {durable}; "
              f"{cache.stats.retrieve_calls} retrievals so far]")
    cache.close()
    client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
