"""llmnb: the tested helpers behind the notebooks, one module per stage of a model's life.

Importing llmnb first settles whether the Hugging Face hub is reachable and sets
HF_HUB_OFFLINE when it is not, so that nothing later waits on hub retries.
"""
from .hub import configure_hub

OFFLINE = configure_hub()

from .presets import configure  # noqa: E402
from .record import record, save_figure  # noqa: E402

__version__ = "0.1.0"
__all__ = ["OFFLINE", "configure", "record", "save_figure", "__version__"]
