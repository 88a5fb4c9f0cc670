"""ONNX Runtime: the exported graph gives our logits, through its KV cache too; ORT's int8 stays close; refusals."""
import pytest
import torch

from llmnb import checkpoint
from llmnb import onnx_runtime as ox
from llmnb.generate import generate
from llmnb.lora import attach
from llmnb.model import token_logprobs
from llmnb.quantize import quantize_model

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, tokenizer = checkpoint.load("smollm2-tiny-random")
    folder = tmp_path_factory.mktemp("onnx") / "tiny"
    ox.export(model.eval(), tokenizer, folder)
    ox.quantize_int8(folder)
    return model, tokenizer, folder


def test_onnx_runtime_gives_our_logits_padded_batches_included(exported):
    model, tokenizer, folder = exported
    onnx = ox.OnnxModel(folder / ox.FP32_FILE)
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding, as batched prompts are
    with torch.no_grad():
        torch.testing.assert_close(onnx(ids, attention_mask=mask)[0], model(ids, attention_mask=mask)[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(token_logprobs(onnx, ids), token_logprobs(model, ids), atol=1e-4, rtol=0)
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "model.onnx.data", "model.int8.onnx", "tokenizer.json", "README.md"}


def test_decoding_through_the_exported_cache_continues_as_we_do(exported):
    model, tokenizer, folder = exported
    onnx = ox.OnnxModel(folder / ox.FP32_FILE)
    prompt = torch.tensor([tokenizer.encode("Hello there, how are")] * 2)
    assert torch.equal(onnx.generate(prompt, 12), generate(model, prompt, 12, temperature=0))
    # the cache is really used: one step after the prompt equals the whole sequence's last position
    logits, past = onnx.step(prompt.numpy(), torch.ones_like(prompt).numpy(), onnx.empty_past(2))
    assert past[0].shape == (model.config.n_layer, 2, model.config.n_kv_head, prompt.shape[1], model.config.head_dim)


def test_ort_int8_is_smaller_and_close(exported):
    model, _, folder = exported
    int8 = ox.OnnxModel(folder / ox.INT8_FILE)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ours, theirs = model(ids)[0], int8(ids)[0]
    assert 0 < float((theirs - ours).abs().max()) < 0.1 * float(ours.abs().max())  # rounded, not broken
    # a quarter of fp32, plus the tied embedding a second time: ORT's constant folding stores the head's transpose apart
    assert (folder / ox.INT8_FILE).stat().st_size < 0.6 * (folder / "model.onnx.data").stat().st_size


def test_refusals_say_what_to_do(exported, tmp_path):
    model, tokenizer, folder = exported
    with pytest.raises(ValueError, match="export the full-precision model, then quantize_int8"):
        ox.export(quantize_model(checkpoint.load("smollm2-tiny-random")[0], "int8"), tokenizer, tmp_path / "q")
    adapted = checkpoint.load("smollm2-tiny-random")[0]
    attach(adapted, "all-linear", r=2)
    with pytest.raises(ValueError, match="merge them first"):
        ox.export(adapted, tokenizer, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="export the model first"):
        ox.quantize_int8(tmp_path)
    with pytest.raises(FileNotFoundError, match="llmnb.onnx_runtime.export writes one"):
        ox.OnnxModel(tmp_path / "missing.onnx")
    assert not (tmp_path / "q").exists() and not (tmp_path / "a").exists()
