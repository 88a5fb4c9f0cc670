"""Decide once, quickly, whether the Hugging Face hub is reachable, and go offline if not.

`huggingface_hub` reads `HF_HUB_OFFLINE` when it is imported; without it every failed
lookup retries for ~25 s. So `import llmnb` settles the question before anything
imports transformers: an explicit `HF_HUB_OFFLINE` wins, otherwise one TCP connect
with a short timeout decides.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import warnings

HUB_HOST = "huggingface.co"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_reachable(host: str = HUB_HOST, port: int = 443, timeout: float = 1.5) -> bool:
    """True when a TCP connection to the hub opens within `timeout` seconds.

    Runs in a thread because name resolution has no timeout of its own.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def configure_hub() -> bool:
    """Set the offline variables unless the hub answers; return True when offline."""
    if "HF_HUB_OFFLINE" not in os.environ and not hub_reachable():
        for name in OFFLINE_VARIABLES:
            os.environ[name] = "1"
        if "huggingface_hub" in sys.modules:
            # Imported before llmnb: its constants were read already, so set them too.
            import huggingface_hub.constants as constants

            constants.HF_HUB_OFFLINE = True
            warnings.warn(
                "huggingface_hub was imported before llmnb; set HF_HUB_OFFLINE=1 before "
                "importing transformers to avoid slow hub retries.",
                stacklevel=2,
            )
    return is_offline()
