"""Shared by the torch benchmarks: machine description and the JSON result file."""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
from typing import Dict, List

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_results(path: str, rows: List[Dict], device: torch.device, **extra) -> None:
    """Write ``{date, torch, threads, cpu_count, platform, device, gpu, **extra, rows}`` as JSON."""
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           **extra, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")
