"""Getting official files from the Hugging Face hub without waiting on a network that is not there.

``huggingface_hub`` retries a failed request five times with back-off (about 25 s per file) before
it gives up, so a machine with no network would wait minutes for an error. ``hub_download``
returns a cached copy at once, and otherwise opens one TCP connection to the hub (3 s time-out)
before downloading: when that fails, the adapters raise their "these files are needed, pass local
paths" error immediately. With a proxy configured the probe is skipped (the proxy decides), and
``HF_HUB_OFFLINE=1`` is left to ``huggingface_hub`` (it fails fast by itself).
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from typing import Optional
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class HubUnreachableError(ConnectionError):
    """The hub cannot be reached and the file is not in the local cache."""


@lru_cache(maxsize=None)
def _probe(host: str, port: int) -> Optional[str]:
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return None
    except OSError as error:
        return f"{type(error).__name__}: {error}"


def unreachable_reason() -> Optional[str]:
    """Why the hub cannot be reached, or None when it can (or when a proxy makes the probe moot)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    url = urlparse(constants.ENDPOINT)
    if not url.hostname:
        return None
    return _probe(url.hostname, url.port or (443 if url.scheme == "https" else 80))


def cached_file(repo_id: str, filename: str) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def hub_download(repo_id: str, filename: str) -> str:
    """``hf_hub_download`` that answers from the cache first and fails in seconds when offline."""
    from huggingface_hub import constants, hf_hub_download

    cached = cached_file(repo_id, filename)
    if cached is not None:
        return cached
    reason = unreachable_reason()
    if reason is not None:
        raise HubUnreachableError(f"the Hugging Face hub ({constants.ENDPOINT}) is unreachable ({reason}) and "
                                  f"{repo_id}/{filename} is not in the local cache")
    return hf_hub_download(repo_id=repo_id, filename=filename)


def check_repo_available(repo_id: str, probe_file: str = "config.json") -> None:
    """Raise ``HubUnreachableError`` when a hub repository (e.g. the T5 encoder) is neither cached
    nor reachable, so a loader can fail before it spends minutes reading other files."""
    if cached_file(repo_id, probe_file) is None:
        reason = unreachable_reason()
        if reason is not None:
            from huggingface_hub import constants

            raise HubUnreachableError(f"the Hugging Face hub ({constants.ENDPOINT}) is unreachable ({reason}) and "
                                      f"{repo_id} is not in the local cache")
