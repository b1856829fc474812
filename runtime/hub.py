"""Decide, before the model hub client is imported, whether the hub can be reached at all.

Offline, huggingface_hub retries every download for about a minute before giving up. Checking
the hub's address once with a short timeout lets start-up switch the client to offline mode
(cached weights only), so a missing network fails in seconds with a useful message.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def use_offline_hub_if_unreachable() -> bool:
    """Set ``HF_HUB_OFFLINE=1`` when the hub cannot be reached. Must run before huggingface_hub is
    imported (it reads the variable once). Returns whether offline mode is on."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
        return True
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return False  # the direct probe says nothing about a proxy; let the client try
    if hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    return True
