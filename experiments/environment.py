"""The one environment stamp every study writes into its ``config.json`` (``"environment"``).

It says what produced a table: the library's version, Python, the platform, the CPU count, torch
and its threads, the GPU (when one is visible), and the version of every installed package the
studies use (read from the package metadata, so nothing heavy is imported to stamp a run).
"""

from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["PACKAGES", "environment_stamp"]

#: Packages whose installed versions the stamp records (absent ones are left out).
PACKAGES = ("numpy", "scipy", "cvxpy", "pandas", "plotly", "pymoo", "ray", "torchjd", "pycocoevalcap")


def _installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment_stamp() -> dict[str, Any]:
    """``{"mtl_opt", "python", "platform", "cpu_count", "torch", "torch_threads", "cuda",
    <package>: version, ...}`` for this process."""
    import torch

    import mtl_opt

    stamp: dict[str, Any] = {
        "mtl_opt": mtl_opt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for package in PACKAGES:
        found = _installed_version(package)
        if found is not None:
            stamp[package] = found
    return stamp
