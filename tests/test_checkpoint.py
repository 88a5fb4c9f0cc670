import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmnb import assets, checkpoint
from llmnb.generate import generate
from llmnb.hf_bridge import to_hf
from llmnb.model import GPT, GPTConfig
from llmnb.tokenizer import ENDOFTEXT, CharTokenizer, train_bpe


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(["to be or not to be, that is the question; whether 'tis nobler " * 30], 300, special_tokens=[ENDOFTEXT])


def test_smollm2_converts_loads_and_answers():
    model, tokenizer = checkpoint.load_hf("smollm2-135m-instruct")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_load_gives_our_gpt_for_a_registry_name_with_logits_equal_to_transformers():
    ours, tokenizer = checkpoint.load("smollm2-135m-instruct")
    hf, _ = checkpoint.load_hf("smollm2-135m-instruct")
    assert isinstance(ours, GPT) and len(tokenizer) == ours.config.vocab_size == 49152
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_an_llmnb_checkpoint_rebuilds_its_model_and_tokenizer_from_the_file_alone(tmp_path, bpe, flavour):
    make = GPTConfig.gpt2 if flavour == "gpt2" else GPTConfig.llama
    torch.manual_seed(0)
    model = GPT(make(vocab_size=bpe.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    path = checkpoint.save_checkpoint(tmp_path / "run" / "checkpoint.pt", model.state_dict(), model.config, bpe, step=7)
    loaded, tokenizer = checkpoint.load(tmp_path / "run")  # the run folder, as train() leaves it
    assert loaded.config == model.config and checkpoint.read_checkpoint(path)["step"] == 7
    text = "to be or not, that is the question"
    assert tokenizer.encode(text) == bpe.encode(text) and tokenizer.decode(bpe.encode(text)) == text
    ids = torch.tensor([bpe.encode(text)])
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert tokenizer.eos_token == ENDOFTEXT
    assert not any(p.name.startswith(".") for p in path.parent.iterdir()), "no temporary file is left behind"


def test_a_character_checkpoint_keeps_its_character_tokenizer(tmp_path):
    chars = CharTokenizer.train("abc xyz\n")
    model = GPT(GPTConfig.gpt2(vocab_size=chars.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    checkpoint.save_checkpoint(tmp_path / "c.pt", model.state_dict(), model.config, chars)
    _, tokenizer = checkpoint.load(tmp_path / "c.pt")
    assert isinstance(tokenizer, CharTokenizer) and tokenizer.chars == chars.chars


def test_our_hf_folder_loads_as_our_gpt_and_in_transformers(tmp_path, bpe):
    torch.manual_seed(1)
    model = GPT(GPTConfig.llama(vocab_size=bpe.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    to_hf(model, tmp_path / "hf", checkpoint.bpe_as_hf(bpe))
    loaded, tokenizer = checkpoint.load(tmp_path / "hf")
    ids = torch.tensor([bpe.encode("whether 'tis nobler")])
    assert tokenizer.encode("whether 'tis nobler") == ids[0].tolist()
    assert torch.equal(generate(loaded, ids, 8, temperature=0), generate(model, ids, 8, temperature=0))
    assert len(AutoTokenizer.from_pretrained(tmp_path / "hf")) == bpe.vocab_size
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, bpe):
    small = GPT(GPTConfig.gpt2(vocab_size=bpe.vocab_size - 10, block_size=16, n_layer=1, n_head=2, n_embd=16))
    checkpoint.save_checkpoint(tmp_path / "x.pt", small.state_dict(), small.config, bpe)
    with pytest.raises(ValueError, match=f"the tokenizer has {bpe.vocab_size} tokens but the model's embedding only {bpe.vocab_size - 10}"):
        checkpoint.load(tmp_path / "x.pt")


def test_folders_that_are_not_models_are_refused(tmp_path, bpe):
    assert checkpoint.resolve_model(str(assets.prepare_smollm2())) == str(assets.prepare_smollm2())
    with pytest.raises(assets.ModelNotFound, match="no config.json"):
        checkpoint.resolve_model(str(tmp_path))
    with pytest.raises(assets.ModelNotFound, match="no model folder"):
        checkpoint.resolve_model(str(tmp_path / "missing"))
    model = GPT(GPTConfig.gpt2(vocab_size=bpe.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    to_hf(model).save_pretrained(tmp_path / "no-tokenizer")  # what a careless script leaves: AutoTokenizer would load it empty
    with pytest.raises(assets.ModelNotFound, match="no tokenizer"):
        checkpoint.load(tmp_path / "no-tokenizer")
    with pytest.raises(FileNotFoundError, match="no llmnb checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")


def test_uncached_hub_id_offline_fails_fast_with_the_alternatives():
    start = time.perf_counter()
    with pytest.raises(assets.ModelNotFound, match="smollm2-135m-instruct"):
        checkpoint.load("someone/never-downloaded-model")
    assert time.perf_counter() - start < 5


def test_the_tiny_chat_stand_in_has_smollm2s_tokenizer_and_leaves_the_random_stream_alone():
    state = torch.random.get_rng_state()
    assets.prepare_tiny_chat(force=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    model, tokenizer = checkpoint.load(assets.TINY_CHAT)
    smol = AutoTokenizer.from_pretrained(assets.prepare_smollm2())
    assert tokenizer.chat_template == smol.chat_template and len(tokenizer) == len(smol) == model.config.vocab_size
    assert model.config.n_layer == 2 and model.config.eos_token_id == smol.eos_token_id


def test_a_checkpoint_of_adapters_alone_is_not_taken_for_a_whole_model(tmp_path):
    model = GPT(GPTConfig.llama(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16))
    checkpoint.save_checkpoint(tmp_path / "checkpoint.pt", {"blocks.0.attn.q_proj.lora_A": torch.zeros(2, 16)}, model.config,
                               CharTokenizer(list("abc")), trainable_only=True)
    with pytest.raises(ValueError, match="holds only the parameters that trained"):
        checkpoint.load(tmp_path)
