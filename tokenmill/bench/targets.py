"""The servers a bench run measures: `--url` as given, or spawned ones, brought up one after another
or, for a round of `--rounds`, all at once.

With every target up for the round, it can measure each concurrency level on every target back to
back, seconds apart, and turn the order round every other round: on a VM whose speed moves by
10-20% over minutes, a ratio then compares two measurements taken in the same minute, and neither
target is always the first (or always the second) to meet a level. Each round starts fresh
servers: kept up, a server would meet round 2's prompts already cached from round 1 (llama-server,
warm, fell from 224 to 128 tokens/s at concurrency 8 in a trial run), so no round would measure
what the first did.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

from tokenmill.bench.spawn import SpawnedServer

Target = tuple[str, str, SpawnedServer | None]  # (url, label, the spawned server or None)


@dataclass(frozen=True)
class _Spawn:
    label: str
    start: Callable[[], SpawnedServer]


def one_at_a_time(
    args: argparse.Namespace, extra_flags: list[str] | None = None, cpp_slots: int | None = None
) -> Iterator[Target]:
    """Each server to measure, each stopped when the caller moves on: --url as given, or one
    tokenmill spawned per --modes entry and --serve-args variant (plus `extra_flags`), then
    llama-server with `cpp_slots` slots if given (--cpp-baselines)."""
    if args.url:
        yield args.url, args.url, None
        return
    for spawn in _spawns(args, extra_flags, cpp_slots):
        with spawn.start() as server:
            yield server.url, spawn.label, server


@contextmanager
def all_at_once(args: argparse.Namespace, cpp_slots: int | None = None) -> Iterator[list[Target]]:
    """The spawned servers of `one_at_a_time`, all running until the block ends."""
    with ExitStack() as stack:
        running: list[Target] = []
        for spawn in _spawns(args, None, cpp_slots):
            server = stack.enter_context(spawn.start())
            running.append((server.url, spawn.label, server))
        yield running


def alternating(targets: list[Target], round_number: int) -> list[Target]:
    """The order a round meets each level in: as given in odd rounds, reversed in even ones."""
    return targets if round_number % 2 else targets[::-1]


def _spawns(args: argparse.Namespace, extra_flags: list[str] | None, cpp_slots: int | None) -> list[_Spawn]:
    cpus = cpu_list(args.server_cpus)
    spawns: list[_Spawn] = []
    for entry in args.modes.split(","):
        for extra in args.serve_args or [""]:
            engine, mode = engine_and_mode(entry)
            flags = [
                "--mode",
                mode,
                *(["--engine", engine] if engine else []),
                *shlex.split(extra),
                *(extra_flags or []),
            ]
            spawns.append(_Spawn(f"{entry} {extra}".strip(), partial(SpawnedServer, flags, cpus=cpus)))
    if cpp_slots:
        from tokenmill.bench import cpp

        spawns.append(_Spawn(cpp.SERVER_LABEL, partial(cpp.llama_server_for, args, cpp_slots, cpus)))
    return spawns


def engine_and_mode(label: str) -> tuple[str, str]:
    """A --modes entry, or a spawned target's label (the entry, then any --serve-args), as
    (engine, mode): 'torch:batch --x' -> ('torch', 'batch'), 'batch' -> ('', 'batch')."""
    engine, _, mode = label.split()[0].rpartition(":")
    return engine, mode


def cpu_list(spec: str | None) -> set[int] | None:
    """'0-2,5' -> {0, 1, 2, 5}."""
    if not spec:
        return None
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus
