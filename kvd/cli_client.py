"""`kvd` subcommands that talk to a running daemon (ls, stats, rm, health, export, import)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Registered by kvd.cli; filled in by the operator tooling."""
