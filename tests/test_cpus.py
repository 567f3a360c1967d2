"""Thread counts from the CPUs a process may really use: affinity, capped by cgroup quotas.

Fed fake affinity counts and fake cgroup trees, so they mean the same on any machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.config import Settings
from tokenmill.cpus import cgroup_limits, parse_cpu_max, usable_cpus


def test_a_cgroup_v2_quota_of_one_cpu_on_a_64_core_host_gives_one_thread():
    assert usable_cpus(64, cpu_max=["100000 100000"]) == 1


def test_no_cgroup_v2_limit_gives_the_affinity_count():
    assert usable_cpus(2, cpu_max=["max 100000"]) == 2
    assert usable_cpus(6, cpu_max=[]) == 6


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("200000 100000", 2),
        ("150000 100000", 1),
        ("50000 100000", 1),
        ("400000 50000", 8),
        ("max 100000", None),
        ("max", None),
    ],
)
def test_cpu_max_rounds_a_fractional_quota_down_but_never_below_one(text, cpus):
    assert parse_cpu_max(text) == cpus


def test_the_tightest_of_affinity_and_every_quota_wins():
    assert usable_cpus(3, cpu_max=["max 100000", "800000 100000"]) == 3  # affinity is tighter
    assert usable_cpus(64, cpu_max=["max 100000", "300000 100000"]) == 3  # a parent's quota applies too
    assert usable_cpus(64, cfs=[("-1", "100000"), ("200000", "100000")]) == 2  # v1: -1 is no limit


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cgroup_v2_limits_are_read_for_the_own_cgroup_and_its_ancestors(tmp_path):
    root = _tree(
        tmp_path, {"cpu.max": "max 100000", "kubepods/cpu.max": "max 100000", "kubepods/pod1/cpu.max": "200000 100000"}
    )
    cpu_max, cfs = cgroup_limits(root, proc_cgroup="0::/kubepods/pod1\n")
    assert cpu_max == ["200000 100000", "max 100000", "max 100000"] and cfs == []
    assert usable_cpus(64, cpu_max, cfs) == 2


def test_cgroup_v1_limits_are_read_from_the_cpu_controller(tmp_path):
    root = _tree(
        tmp_path,
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
            "cpu,cpuacct/cpu.cfs_quota_us": "-1",
            "cpu,cpuacct/cpu.cfs_period_us": "100000",
        },
    )
    cpu_max, cfs = cgroup_limits(root, proc_cgroup="4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert cpu_max == [] and cfs == [("150000", "100000"), ("-1", "100000")]
    assert usable_cpus(64, cpu_max, cfs) == 1


def test_no_cgroup_files_at_all_leaves_the_affinity(tmp_path):
    assert cgroup_limits(tmp_path, proc_cgroup="0::/\n") == ([], [])


def test_the_default_thread_count_divides_the_usable_cpus_between_replicas(monkeypatch):
    monkeypatch.setattr("tokenmill.config.available_cpus", lambda: 4)
    assert Settings().threads_per_replica() == 4
    assert Settings(replicas=2).threads_per_replica() == 2
    assert Settings(replicas=8).threads_per_replica() == 1
    assert Settings(threads=3).threads_per_replica() == 3  # an explicit setting wins
