"""A model or adapter reference (local folder or hub id) -> a local folder, with its provenance.

Hub ids are resolved with huggingface_hub: from the local cache first (so offline machines work when
the files were downloaded before), then from the hub unless HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from xpack.errors import XpackError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


@dataclass(frozen=True)
class Source:
    ref: str  # what the user gave
    path: Path  # local folder
    repo_id: str | None = None
    revision: str | None = None  # commit hash of the hub snapshot

    def describe(self) -> dict:
        return {"ref": self.ref, "path": str(self.path), "repo_id": self.repo_id, "revision": self.revision}


def resolve(ref: str, what: str) -> Source:
    """``what`` is 'base model' or 'adapter' (for messages)."""
    local = Path(ref).expanduser()
    if local.exists():
        if not local.is_dir():
            raise XpackError(f"{what} {ref} is a file; pass the folder that holds it")
        return Source(ref, local.resolve())
    ref_id, _, revision = ref.partition("@")
    if not HUB_ID.match(ref_id):
        raise XpackError(f"{what} {ref} is neither a local folder nor a Hugging Face hub id (owner/name)")
    return _from_hub(ref, ref_id, revision or None, what)


def _from_hub(ref: str, repo_id: str, revision: str | None, what: str) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.md", "*.tiktoken", "*.py"]
    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=patterns)
    except (LocalEntryNotFoundError, FileNotFoundError):
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise XpackError(
                f"{what} {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"download it first (huggingface-cli download {repo_id}) or pass a local folder"
            ) from None
        try:
            path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        except RepositoryNotFoundError:
            raise XpackError(f"{what} {repo_id} does not exist on the hub or needs a token (huggingface-cli login)") from None
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise XpackError(
                f"{what} {repo_id} is not in the local cache and could not be downloaded ({exc.__class__.__name__}); "
                f"download it where there is a network (huggingface-cli download {repo_id}) or pass a local folder"
            ) from None
    path = Path(path)
    return Source(ref, path, repo_id=repo_id, revision=path.name)
