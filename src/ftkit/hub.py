"""``push_to_hub``: upload a run's output dir to the Hugging Face Hub with ``huggingface_hub``.

Everything that can be known before training is checked before the model loads (one line each):
a repo id, a reachable Hub (``HF_HUB_OFFLINE`` unset) and a token.  The upload itself runs once,
on the main process, after the adapter, the model card and the metrics are written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ftkit.config import check_hub_fields
from ftkit.errors import ConfigError

logger = logging.getLogger(__name__)

# Not uploaded: resumable checkpoints (optimizer state, several times the adapter) and scratch
# files of atomic writes.
IGNORE_PATTERNS = ["checkpoints/**", ".*", "**/.*"]
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    import huggingface_hub

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def check_can_push(train_cfg) -> None:
    """Before training: fail now, not after hours of it, when the upload cannot happen."""
    if not train_cfg.push_to_hub:
        return
    check_hub_fields(train_cfg.push_to_hub, train_cfg.hub_model_id)
    if hub_offline():
        raise ConfigError(
            "push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset it, or "
            "train with push_to_hub false and upload the output dir later (hf upload REPO DIR)"
        )
    import huggingface_hub

    if huggingface_hub.get_token() is None:
        raise ConfigError(
            "push_to_hub needs a Hugging Face token with write access: run `hf auth login` "
            "(or set HF_TOKEN), then train again"
        )


def push(output_dir: Path, train_cfg) -> str:
    """Create the repo if needed and upload ``output_dir``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo = train_cfg.hub_model_id
    api.create_repo(repo, exist_ok=True, private=train_cfg.hub_private_repo or None)
    commit = api.upload_folder(
        repo_id=repo,
        folder_path=str(output_dir),
        commit_message=f"ftkit: upload {Path(output_dir).name}",
        ignore_patterns=IGNORE_PATTERNS,
    )
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo}"
    logger.info("pushed %s to the Hub: %s", Path(output_dir).name, url)
    return str(url)
