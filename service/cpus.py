"""How many CPU threads this process may really use.

``os.cpu_count()`` and torch's default see the host's cores; a container's CPU limit (a cgroup
quota: ``docker run --cpus 2``, a Kubernetes ``limits.cpu``) does not show there.  A scorer
that starts one thread per host core under a 2-CPU quota is throttled for most of every
period, so the service caps its threads at :func:`cpu_budget` unless ``engine.threads`` says.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``); None if unlimited."""
    try:
        fields = (root / "cpu.max").read_text().split()  # "<quota> <period>" or "max <period>"
        if fields[0] == "max":
            return None
        return int(fields[0]) / int(fields[1] if len(fields) > 1 else 100000)
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def cpu_budget(root: Path = CGROUP) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded up)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root)
    return max(1, min(n, math.ceil(quota))) if quota else max(1, n)
