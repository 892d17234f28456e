"""The CPU budget: affinity mask and cgroup quota (v2 and v1 files), and the service using it."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from service.cpus import cgroup_cpu_quota, cpu_budget
from tests.conftest import LiveServer, enc_dec_config


def _v2(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(text)
    return root


def _v1(root: Path, quota: int, period: int) -> Path:
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize("text, quota", [("max 100000\n", None), ("150000 100000\n", 1.5), ("400000 200000", 2.0),
                                         ("garbage", None)])
def test_cgroup_v2_quota(tmp_path: Path, text: str, quota: float | None) -> None:
    assert cgroup_cpu_quota(_v2(tmp_path, text)) == quota


def test_cgroup_v1_quota_and_no_cgroup(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(_v1(tmp_path / "a", 250000, 100000)) == 2.5
    assert cgroup_cpu_quota(_v1(tmp_path / "b", -1, 100000)) is None  # -1: unlimited
    assert cgroup_cpu_quota(tmp_path / "none") is None


def test_budget_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert cpu_budget(tmp_path / "none") == cpus
    assert cpu_budget(_v2(tmp_path / "half", "50000 100000")) == 1  # half a CPU still gets one thread
    assert cpu_budget(_v2(tmp_path / "big", f"{(cpus + 8) * 100000} 100000")) == cpus


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to give the server fewer than torch takes")
def test_service_caps_torchs_threads_at_the_budget(tmp_path: Path, tiny_bert: Path, tiny_gpt2: Path) -> None:
    config = enc_dec_config(tiny_bert, tiny_gpt2, server={"log_level": "info"})
    del config["engine"]["threads"]
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mine)})  # the server inherits one CPU ...
    try:  # ... while OMP_NUM_THREADS makes torch start two threads
        server = LiveServer(config, tmp_path, env={"OMP_NUM_THREADS": "2"})
    finally:
        os.sched_setaffinity(0, mine)
    try:
        server.wait_ready()
        r = httpx.post(server.url + "/v1/score", json={"items": [{"prompt": "hi", "response": "hello"}]}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        server.stop()
    assert "engine.threads unset: 1 CPU threads, not torch's 2" in server.log()
