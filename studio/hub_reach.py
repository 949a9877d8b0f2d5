"""Whether the Hugging Face hub answers, asked once a minute with a short timeout. Offline, a model load reads only
the local cache and fails at once with a clear message, instead of a minute of "Retrying in 8s"."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

CHECK_EVERY_S = 60.0
TIMEOUT_S = 2.0
_last: tuple[float, str, bool] | None = None  # (when, endpoint, reachable)


def hub_reachable() -> bool:
    global _last
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    now, endpoint = time.monotonic(), constants.ENDPOINT
    if _last is None or _last[1] != endpoint or now - _last[0] > CHECK_EVERY_S:
        url = urlparse(endpoint)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=TIMEOUT_S).close()
            reachable = True
        except OSError:  # no route, no DNS, refused, timed out
            reachable = False
        _last = (now, endpoint, reachable)
    return _last[2]
