"""The Hugging Face hub, asked once before anything loads from it. Unreachable (no network,
a firewall), `datasets` and `transformers` retry each file five times with back-off: 20+
seconds of warnings before their one error. One quick question first turns that into one
line that says so, and what to do instead."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Literal

from sae_ray.config import ConfigError

OFFLINE_HINT = "set HF_HUB_OFFLINE=1 to use what is cached, or give a local path"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@cache
def unreachable(repo_id: str, kind: Literal["model", "dataset"]) -> str | None:
    """Why the hub cannot answer for `repo_id` (None: it can, or it need not: offline mode).
    A repository the hub says it lacks is refused here too."""
    if offline() or Path(repo_id).expanduser().exists():
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi()
    ask = api.dataset_info if kind == "dataset" else api.model_info
    try:
        ask(repo_id, timeout=10)
    except RepositoryNotFoundError:
        return f"the hub has no {kind} {repo_id!r}"
    except HfHubHTTPError:
        return None  # gated or rate-limited: the loader says what it needs
    except Exception as err:  # the network: a refused or unresolved connection, a timeout
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"cannot reach the Hugging Face hub ({reason}); {OFFLINE_HINT}"
    return None


def check(field: str, name: str, repo_id: str, kind: Literal["model", "dataset"]) -> None:
    """A ConfigError naming `field` when the hub cannot serve `repo_id`."""
    reason = unreachable(repo_id, kind)
    if reason is not None:
        raise ConfigError(f"{field}: cannot load {name!r}: {reason}")


def model_config(where: str):
    """A model's config from a local folder or the cache, else from the hub when it answers
    (None when neither can say)."""
    from transformers import AutoConfig

    try:  # no network
        return AutoConfig.from_pretrained(where, local_files_only=True)
    except Exception:
        pass
    if unreachable(where, "model") is not None:
        return None
    try:
        return AutoConfig.from_pretrained(where)
    except Exception:
        return None
