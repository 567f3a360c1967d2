"""How many CPUs this process may really use: its affinity mask, capped by its cgroup's CPU quota
(and, for the prefix cache's host tier, how much memory: `available_memory`).

`os.cpu_count()` is the host's core count. In a container with a CPU quota (a Kubernetes pod with
`limits.cpu: 2` on a 64-core node) it says 64, and 64 spinning llama.cpp threads on 2 CPUs' worth
of time collapse: a thread that waits at a barrier for a descheduled one burns its whole slice.
The quota is read from cgroup v2 (`cpu.max`, for the process's own cgroup and every ancestor)
or cgroup v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`); a fractional quota rounds down, never
below one CPU, because a thread more than the quota allows is the one that gets descheduled.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpus_from_quota(quota: float | None, period: float | None) -> int | None:
    """Whole CPUs a CFS quota allows, or None for no quota."""
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return max(1, int(quota // period))


def parse_cpu_max(text: str) -> int | None:
    """cgroup v2 `cpu.max` ('QUOTA PERIOD' or 'max PERIOD') -> whole CPUs, or None for no limit."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = float(parts[1]) if len(parts) > 1 else 100_000.0
    return cpus_from_quota(float(parts[0]), period)


def usable_cpus(affinity: int, cpu_max: list[str] | None = None, cfs: list[tuple[str, str]] | None = None) -> int:
    """The CPUs a process may use: its affinity count, capped by the tightest quota it is under.

    `cpu_max` holds the cgroup v2 `cpu.max` text of the process's cgroup and each ancestor; `cfs`
    the cgroup v1 (`cpu.cfs_quota_us`, `cpu.cfs_period_us`) pairs of the same. Either may be empty."""
    quotas = [parse_cpu_max(text) for text in cpu_max or []]
    quotas += [cpus_from_quota(float(quota), float(period)) for quota, period in cfs or []]
    return max(1, min([affinity, *(q for q in quotas if q is not None)]))


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroups(proc_cgroup: str) -> dict[str, str]:
    """/proc/self/cgroup -> {controller: path}; the v2 unified hierarchy is keyed ''."""
    own = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _up_to(root: Path, path: str) -> list[Path]:
    """The folder of `path` under `root` and each of its ancestors up to `root`."""
    folder = root / path.strip("/")
    folders = [folder]
    while folder != root and root in folder.parents:
        folder = folder.parent
        folders.append(folder)
    return folders


def cgroup_limits(root: Path = _CGROUP_ROOT, proc_cgroup: str | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """The CPU quota files that apply to this process: v2 `cpu.max` texts and v1 quota/period pairs."""
    own = _own_cgroups(proc_cgroup if proc_cgroup is not None else _read(Path("/proc/self/cgroup")) or "")
    cpu_max = []
    if "" in own:
        cpu_max = [text for f in _up_to(root, own[""]) if (text := _read(f / "cpu.max")) is not None]
    cfs = []
    if "cpu" in own:
        for mount in (root / "cpu", root / "cpu,cpuacct"):
            for folder in _up_to(mount, own["cpu"]):
                quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                if quota is not None and period is not None:
                    cfs.append((quota, period))
            if cfs:
                break
    return cpu_max, cfs


@lru_cache(maxsize=1)
def available_cpus() -> int:
    """This process's usable CPUs, read once (affinity and quotas do not change under a server)."""
    cpu_max, cfs = cgroup_limits()
    return usable_cpus(_affinity(), cpu_max, cfs)


def memory_limit(physical: int, memory_max: list[str]) -> int:
    """The bytes a process may use: the machine's, capped by the tightest cgroup v2 `memory.max`
    of its cgroup and its ancestors ('max': no limit)."""
    limits = [int(text) for text in memory_max if text.isdigit()]
    return min([physical, *limits])


@lru_cache(maxsize=1)
def available_memory() -> int:
    """This process's memory, read once: what the prefix cache's host tier is sized from."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    own = _own_cgroups(_read(Path("/proc/self/cgroup")) or "")
    texts = []
    if "" in own:
        texts = [text for f in _up_to(_CGROUP_ROOT, own[""]) if (text := _read(f / "memory.max")) is not None]
    return memory_limit(physical, texts)
