import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from llmnb import lora
from llmnb.checkpoint import load, load_hf
from llmnb.hf_bridge import hf_module_name, to_hf
from llmnb.model import GPT, GPTConfig

TARGETS = ["q_proj", "v_proj"]


def small_pair(seed: int = 0):
    torch.manual_seed(seed)
    ours = GPT(GPTConfig.llama(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    return ours, to_hf(ours)


def randomize_b(model, seed: int = 1) -> None:
    """B starts at zero; give it values so that the adapters change the outputs and receive gradients in A too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.adapters(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)


def copy_into_peft(ours, peft_model) -> None:
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, layer in lora.adapters(ours).items():
            target = modules[f"base_model.model.{hf_module_name(ours.config, name)}"]
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)


def test_an_adapted_model_starts_equal_to_its_base_and_merging_changes_nothing_but_speed():
    ours, _ = small_pair()
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        base = ours(x)[0]
    names = lora.attach(ours, TARGETS, r=4, alpha=8)
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    counts = lora.count_parameters(ours)
    assert counts["trainable"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))  # q: 32 -> 32, v: 32 -> 16 (two kv heads of 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], base, atol=0, rtol=0)
    randomize_b(ours)
    with torch.no_grad():
        adapted = ours(x)[0]
        assert (adapted - base).abs().max() > 1e-3
        lora.merge(ours)
        torch.testing.assert_close(ours(x)[0], adapted, atol=1e-5, rtol=0)
        lora.unmerge(ours)
        torch.testing.assert_close(ours(x)[0], adapted, atol=1e-5, rtol=0)
        q = lora.adapters(ours)["blocks.0.attn.q_proj"]
        torch.testing.assert_close(q.base.weight + q.delta_weight(), q.base.weight + q.scaling * q.lora_B @ q.lora_A)


@pytest.fixture(scope="module")
def smollm2_pair():
    ours, tokenizer = load("smollm2-135m-instruct")
    hf, _ = load_hf("smollm2-135m-instruct")
    lora.attach(ours, TARGETS, r=8, alpha=16)
    randomize_b(ours)
    theirs = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    copy_into_peft(ours, theirs)
    return ours, theirs, tokenizer


@pytest.mark.cpu_paths
def test_logits_and_gradients_equal_peft_on_smollm2(smollm2_pair):
    ours, theirs, tokenizer = smollm2_pair
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is Rome.")])
    ours.train(), theirs.train()
    logits, loss = ours(ids[:, :-1], ids[:, 1:])
    out = theirs(input_ids=ids[:, :-1], labels=ids[:, :-1])
    their_loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)
    loss.backward()
    their_loss.backward()
    modules = dict(theirs.named_modules())
    for name, layer in lora.adapters(ours).items():
        target = modules[f"base_model.model.{hf_module_name(ours.config, name)}"]
        torch.testing.assert_close(layer.lora_A.grad, target.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad, target.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
    assert lora.count_parameters(ours)["trainable"] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.cpu_paths
def test_a_few_optimizer_steps_leave_the_same_weights_as_peft():
    """In float64 on both sides: AdamW divides by the root of the squared gradient, so a last-bit difference in a float32
    sum (another processor's math library rounds otherwise) becomes a step-sized one after a few steps; in float64
    that rounding sits ~9 orders of magnitude below the tolerance, on any CPU. alpha != r, so that a wrong scaling shows."""
    ours, hf = small_pair(3)
    lora.attach(ours, "all-linear", r=4, alpha=8)
    randomize_b(ours)
    theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.ALL_LINEAR), lora_dropout=0.0))
    copy_into_peft(ours, theirs)
    ours.double(), theirs.double()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(5)
    for _ in range(3):
        x = torch.randint(0, 96, (2, 16))
        ours(x[:, :-1], x[:, 1:])[1].backward()
        torch.nn.functional.cross_entropy(theirs(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        for opt in (opt_ours, opt_theirs):
            opt.step()
            opt.zero_grad()
    modules = dict(theirs.named_modules())
    for name, layer in lora.adapters(ours).items():
        target = modules[f"base_model.model.{hf_module_name(ours.config, name)}"]
        assert layer.lora_A.dtype == torch.float64
        torch.testing.assert_close(layer.lora_A, target.lora_A["default"].weight, atol=1e-10, rtol=0)
        torch.testing.assert_close(layer.lora_B, target.lora_B["default"].weight, atol=1e-10, rtol=0)


def test_adapter_files_load_both_ways_with_identical_logits(tmp_path):
    ours, hf = small_pair(4)
    lora.attach(ours, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    randomize_b(ours)
    lora.save_adapter(ours, tmp_path / "ours", base_model="tiny-llama")
    x = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        expected = ours(x)[0]
        peft_loaded = PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
        torch.testing.assert_close(peft_loaded(input_ids=x).logits, expected, atol=1e-5, rtol=0)
    peft_loaded.save_pretrained(tmp_path / "theirs")  # peft writes the folder now; we read it
    fresh, _ = small_pair(4)
    assert lora.load_adapter(fresh, tmp_path / "theirs") == list(lora.adapters(ours))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], expected, atol=1e-5, rtol=0)


def test_bad_targets_ranks_and_bases_are_refused_clearly(tmp_path):
    ours, _ = small_pair()
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no linear layer; this model's linear layers are named \['down_proj', 'gate_proj', 'k_proj'"):
        lora.attach(ours, ["c_attn"])
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        lora.attach(ours, TARGETS, r=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        lora.attach(ours, TARGETS, alpha=0)
    lora.attach(ours, TARGETS, r=4, alpha=8)
    lora.save_adapter(ours, tmp_path / "a", base_model="outputs/models/tiny-llama")
    with pytest.raises(ValueError, match="was trained on 'outputs/models/tiny-llama', not 'smollm2-135m-instruct'"):
        lora.load_adapter(small_pair()[0], tmp_path / "a", expect_base="smollm2-135m-instruct")
    wider = GPT(GPTConfig.llama(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    with pytest.raises(ValueError, match=r"does not fit this model at blocks.0.attn.q_proj.lora_A: stored \(4, 32\), model \(4, 64\); it was trained on outputs/models/tiny-llama"):
        lora.load_adapter(wider, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"):
        lora.load_adapter(wider, tmp_path)


def test_merge_and_unload_leaves_plain_linear_layers_with_the_adapted_outputs():
    ours, _ = small_pair()
    lora.attach(ours, "all-linear", r=4, alpha=8)
    randomize_b(ours)
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        adapted = ours(x)[0]
        lora.merge_and_unload(ours)
        torch.testing.assert_close(ours(x)[0], adapted, atol=1e-5, rtol=0)
    assert not lora.adapters(ours) and type(ours.blocks[0].attn.q_proj) is torch.nn.Linear
    assert set(ours.state_dict()) == set(GPT(ours.config).state_dict()), "the merged model has the base's own layout"


def test_disabled_adapters_give_the_base_model_and_come_back_on_and_merged_ones_are_refused():
    torch.manual_seed(0)
    base = GPT(GPTConfig.llama(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    model = copy.deepcopy(base)
    lora.attach(model, "all-linear", r=2, alpha=4)
    with torch.no_grad():
        for layer in lora.adapters(model).values():
            layer.lora_B.normal_()
    ids = torch.tensor([[1, 2, 3, 4]])
    adapted = model(ids)[0]
    with lora.disabled(model):
        assert torch.allclose(model(ids)[0], base(ids)[0], atol=1e-6)
    assert torch.equal(model(ids)[0], adapted) and not torch.allclose(adapted, base(ids)[0], atol=1e-3)
    lora.merge(model)
    with pytest.raises(ValueError, match="unmerge first"):
        with lora.disabled(model):
            pass
