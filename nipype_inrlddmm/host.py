"""What this machine, or this SLURM job, has left: the memory a process can still allocate.

Read from the operating system (``/proc/meminfo``, the cgroup's limit) or the
CUDA driver, outside the engine, which touches no files: the callers pass the
figure to :func:`nipype_inrlddmm.engine.check_memory` and
:func:`~nipype_inrlddmm.engine.register_volumes`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _cgroup_available() -> int | None:
    """Memory left under this process's cgroup limit (v2 or v1), or None when unlimited/unknown."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, controllers, relative = line.split(":", 2)
            if hierarchy == "0":
                candidates.append((Path("/sys/fs/cgroup") / relative.lstrip("/"), "memory.max", "memory.current",
                                   "inactive_file"))
            elif "memory" in controllers.split(","):
                candidates.append((Path("/sys/fs/cgroup/memory") / relative.lstrip("/"), "memory.limit_in_bytes",
                                   "memory.usage_in_bytes", "total_inactive_file"))
    except (OSError, ValueError):
        pass
    candidates += [(Path("/sys/fs/cgroup"), "memory.max", "memory.current", "inactive_file"),
                   (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes",
                    "total_inactive_file")]
    for folder, limit_name, usage_name, inactive_name in candidates:
        try:
            limit_text = (folder / limit_name).read_text().strip()
            if limit_text == "max" or int(limit_text) >= 2**60:
                continue
            usage = int((folder / usage_name).read_text())
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
            reclaimable = int(stat.get(inactive_name, 0))
            return max(0, int(limit_text) - usage + reclaimable)
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes this process can still allocate on ``device``, or None when unknown.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (else ``SC_AVPHYS_PAGES``),
    capped by the cgroup limit (a SLURM job's ``--mem``, a container's).
    CUDA: the free memory of the device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_available()
    return found if limit is None else min(found, limit)
