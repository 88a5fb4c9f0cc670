"""Tests run offline with the smoke preset; set before anything imports transformers."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLMNB_PRESET", "smoke")

import pytest  # noqa: E402
import torch  # noqa: E402

# Small random models of each flavour, shared by the model and generation tests.
MODEL_CONFIGS = {
    "gpt2": dict(flavour="gpt2", vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64),
    "llama-gqa": dict(flavour="llama", vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, rope_theta=500.0),
    "llama-tied-bias": dict(flavour="llama", vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64, tie_embeddings=True, bias=True),
}


@pytest.fixture(params=list(MODEL_CONFIGS), scope="module")
def pair(request):
    """(our GPT with random weights, the same weights in transformers)."""
    from llmnb.model import GPT, GPTConfig, to_hf

    values = dict(MODEL_CONFIGS[request.param])
    make = GPTConfig.gpt2 if values.pop("flavour") == "gpt2" else GPTConfig.llama
    torch.manual_seed(0)
    ours = GPT(make(**values)).eval()
    return ours, to_hf(ours)
