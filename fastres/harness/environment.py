"""The environment a result was measured in: hardware, versions, commit."""


from __future__ import annotations

import datetime as _dt
import os
import platform

import torch

from fastres._version import __version__
from fastres.backends.records import cpu_model


def commit() -> tuple[str, bool | None]:
    """(commit, dirty) of the fastres source the run measures: ``FASTRES_COMMIT`` (a sha, with
    ``+dirty`` when the working tree had changes), which the project's scripts set from git
    (scripts/parity.sh, bench/device_check.sh); ("unknown", None) otherwise. The package itself
    reads no repository."""
    env = os.environ.get("FASTRES_COMMIT", "").strip()
    if not env:
        return "unknown", None
    return env.removesuffix("+dirty"), env.endswith("+dirty")


def environment(device: torch.device) -> dict:

    sha, dirty = commit()
    env = {
        "fastres": __version__,
        "commit": sha,
        "commit_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "hostname": platform.node(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # Other work on the machine skews CPU timings: the 1-minute load average at the start.
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for mod in ("torchvision", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if device.type == "cuda":
        env["cudnn"] = torch.backends.cudnn.version()
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return env


def hardware_line(env: dict) -> str:
    hw = env["gpu"] or f"{env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} threads)"
    sha = env["commit"][:12] + ("+dirty" if env.get("commit_dirty") else "")
    return (f"{hw} | torch {env['torch']} | torchvision {env['torchvision']} | "
            f"triton {env['triton']} | fastres {env['fastres']} @ {sha}")
