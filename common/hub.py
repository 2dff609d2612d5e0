"""A Hugging Face model ID as the planner needs it: its config.json and weight index, and how much of it a node's cache holds."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(Exception):
    """The model's files could not be read from the Hub (or its offline cache)."""


def is_hub_id(model: str) -> bool:
    """`owner/name` that is no path on this machine."""
    return bool(_REPO_ID.match(model)) and not os.path.exists(model)


@dataclass(frozen=True)
class HubCheckpoint:
    repo_id: str
    folder: Path                  # the cache snapshot holding config.json (+ the index)
    weight_files: tuple[str, ...]
    total_bytes: float | None     # the index's total_size


def _endpoint() -> str | None:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when it is imported.
    return os.environ.get("HF_ENDPOINT") or None


def fetch_metadata(repo_id: str, revision: str | None = None) -> HubCheckpoint:
    """config.json and the safetensors index of `repo_id`, through huggingface_hub (HF_TOKEN,
    HF_ENDPOINT and HF_HUB_OFFLINE honoured; offline, the cache alone answers)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    def download(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=_endpoint()))

    try:
        config = download(CONFIG)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "offline (HF_HUB_OFFLINE) and not in the cache" if offline else str(exc).strip()
        raise HubError(f"cannot read {repo_id}/{CONFIG} from the Hugging Face Hub: "
                       f"{why.splitlines()[0] if why else type(exc).__name__}") from None
    try:
        index = json.loads(download(INDEX).read_text())
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return HubCheckpoint(repo_id, config.parent, ("model.safetensors",), None)
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise HubError(f"cannot read {repo_id}/{INDEX}: {exc}") from None
    files = tuple(sorted(set((index.get("weight_map") or {}).values())))
    total = (index.get("metadata") or {}).get("total_size")
    return HubCheckpoint(repo_id, config.parent, files, float(total) if total else None)
