"""kvd: a tiered KV-cache storage daemon with attention-aware retrieval for long-context LLMs."""

__version__ = "0.1.0"
