"""Tests run offline with the smoke preset; set before anything imports transformers."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLMNB_PRESET", "smoke")
