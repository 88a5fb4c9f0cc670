"""Decide once, quickly, whether the Hugging Face hub is reachable, and go offline if not.

`huggingface_hub` reads `HF_HUB_OFFLINE` when it is imported; without it every failed
lookup retries for ~25 s. So the question is settled just before anything imports
`huggingface_hub` (transformers, datasets, peft and trl all do): `import llmnb` installs
an import hook that probes then, and only then. Importing llmnb's model code, which
needs no hub, opens no connection. An explicit `HF_HUB_OFFLINE` wins, otherwise one TCP
connect with a short timeout decides.
"""
from __future__ import annotations

import importlib.abc
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


class _SettleBeforeHubImport(importlib.abc.MetaPathFinder):
    """Runs `configure_hub` the first time anything imports `huggingface_hub`, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "huggingface_hub" and self in sys.meta_path:
            sys.meta_path.remove(self)
            configure_hub()
        return None  # the normal finders do the import


def settle_on_first_use() -> None:
    """Probe when the hub library is first imported; at once if it was imported already."""
    if "huggingface_hub" in sys.modules:
        configure_hub()
    elif not any(isinstance(f, _SettleBeforeHubImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _SettleBeforeHubImport())
