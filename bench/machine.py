"""What machine and software a benchmark ran on, for its results file."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any, Iterable


def version_of(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def machine_info(packages: Iterable[str], **extra: Any) -> dict[str, Any]:
    versions = {name: version_of(name) for name in packages}
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), **extra,
            "versions": {k: v for k, v in versions.items() if v}}
