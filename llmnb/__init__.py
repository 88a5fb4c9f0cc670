"""llmnb: the tested helpers behind the notebooks, one module per stage of a model's life.

Importing llmnb arranges for the Hugging Face hub question to be settled (HF_HUB_OFFLINE
set when the hub does not answer) just before anything imports `huggingface_hub`, so that
nothing waits on hub retries and importing code that needs no hub opens no connection.
`llmnb.OFFLINE` settles it on demand.
"""
import logging

from .hub import configure_hub, settle_on_first_use

settle_on_first_use()
# torchao (which peft imports when it is installed) logs, with absolute paths, each GPU-only extension a CPU machine
# cannot load, and torch warns about its enums: nothing a reader can act on
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from .presets import configure  # noqa: E402
from .record import record, save_figure  # noqa: E402

__version__ = "0.1.0"
__all__ = ["OFFLINE", "configure", "record", "save_figure", "__version__"]
_offline: bool | None = None


def __getattr__(name: str):
    global _offline
    if name == "OFFLINE":  # probed on first use, not at import
        if _offline is None:
            _offline = configure_hub()
        return _offline
    raise AttributeError(f"module 'llmnb' has no attribute {name!r}")
