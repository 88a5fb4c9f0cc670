"""Pruning: masks against torch.nn.utils.prune and a direct Wanda computation, exact sparsity, 2:4 groups, and a
structurally pruned model that equals the dense one with the same units switched off and loads in transformers."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune

from llmnb import hf_bridge, prune
from llmnb.lora import attach
from llmnb.model import GPT, GPTConfig
from llmnb.quantize import quantize_model


def llama(**overrides) -> GPT:
    torch.manual_seed(0)
    sizes = dict(vocab_size=96, block_size=32, n_layer=2, n_head=6, n_kv_head=2, n_embd=48, d_ff=64, tie_embeddings=True)
    return GPT(GPTConfig.llama(**{**sizes, **overrides})).eval()


CALIBRATION = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_magnitude_masks_equal_torch_prune_and_remove_exactly_that_share(sparsity):
    model = llama()
    reference = copy.deepcopy(model)
    masks = prune.prune_model(model, "magnitude", sparsity)
    for name, layer in prune.prunable(reference):
        torch_prune.l1_unstructured(layer, "weight", amount=sparsity)
        assert torch.equal(masks[name], layer.weight_mask.bool()), name
        assert torch.equal(model.get_submodule(name).weight, layer.weight), name
    total = sum(m.numel() for m in masks.values())
    assert prune.sparsity(model) == sum(round(sparsity * m.numel()) for m in masks.values()) / total
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)  # the head (tied to the embedding) is never pruned


def _direct_norms(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).double().norm(dim=0).float()


def _wanda_mask(weight: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's rule spelled out: per output row, drop the int(s·in) weights with the smallest |W_ij| · ‖X_j‖."""
    scores = weight.abs() * _direct_norms(x)[None, :]
    drop = int(weight.shape[1] * sparsity)
    order = scores.argsort(dim=1)
    mask = torch.ones_like(weight, dtype=torch.bool)
    for row in range(weight.shape[0]):
        mask[row, order[row, :drop]] = False
    return mask


def test_wanda_masks_equal_a_direct_computation_block_after_pruned_block():
    """Block 0's masks from its own inputs; block 1's from the output of block 0 *after* block 0 was pruned (each block's
    inputs are recorded in one pass of that block, dense, before any of its layers is pruned)."""
    model = llama()
    dense = copy.deepcopy(model)
    masks = prune.prune_model(model, "wanda", 0.5, calibration=CALIBRATION)
    rope = (model.rope_cos[:24][None, None], model.rope_sin[:24][None, None])
    with torch.no_grad():
        x0 = model.wte(CALIBRATION)
        assert torch.equal(masks["blocks.0.attn.q_proj"], _wanda_mask(dense.blocks[0].attn.q_proj.weight, dense.blocks[0].norm1(x0), 0.5))
        x1 = model.blocks[0](x0, rope, None, None, 0)  # the pruned block's output
        b1 = dense.blocks[1]
        assert torch.equal(masks["blocks.1.attn.q_proj"], _wanda_mask(b1.attn.q_proj.weight, b1.norm1(x1), 0.5))
        h = b1.norm2(x1 + b1.attn(b1.norm1(x1), rope, None, None, 1))
        mlp_in = F.silu(b1.mlp.gate_proj(h)) * b1.mlp.up_proj(h)
    assert torch.equal(masks["blocks.1.mlp.down_proj"], _wanda_mask(b1.mlp.down_proj.weight, mlp_in, 0.5))
    for name, mask in masks.items():
        assert (mask.sum(1) == mask.shape[1] - int(mask.shape[1] * 0.5)).all(), name  # the same count in every row


def test_wanda_scores_are_weight_times_input_norm():
    w, x = torch.randn(5, 8), torch.randn(3, 7, 8)
    torch.testing.assert_close(prune.wanda_scores(w, _direct_norms(x)), w.abs() * x.flatten(0, 1).norm(dim=0)[None, :])


@pytest.mark.parametrize("method", prune.METHODS)
def test_two_of_every_four_inputs_are_kept_the_best_two(method):
    model = llama()
    dense = copy.deepcopy(model)
    masks = prune.prune_model(model, method, pattern="2:4", calibration=CALIBRATION)
    assert prune.sparsity(model) == 0.5
    for name, mask in masks.items():
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), name
    w = dense.blocks[0].attn.q_proj.weight.abs() if method == "magnitude" else None
    if w is not None:  # magnitude: in each group of four, every kept weight is at least as large as every dropped one
        groups, keep = w.reshape(w.shape[0], -1, 4), masks["blocks.0.attn.q_proj"].reshape(w.shape[0], -1, 4)
        assert (groups.masked_fill(~keep, float("inf")).amin(-1) >= groups.masked_fill(keep, -1).amax(-1)).all()


def test_sparse_bytes_count_nonzero_values_and_a_one_bit_map():
    model = llama()
    dense_bytes = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    prune.prune_model(model, "magnitude", 0.5)
    matrices = sum(layer.weight.numel() for _, layer in prune.prunable(model))
    assert prune.sparse_bytes(model) == dense_bytes - matrices * 4 + matrices // 2 * 4 + matrices // 8


def test_refusals_say_what_to_do():
    model = llama()
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            prune.prune_model(model, "magnitude", bad)
    with pytest.raises(ValueError, match="choose one of"):
        prune.prune_model(model, "random", 0.5)
    with pytest.raises(ValueError, match="pass calibration token ids"):
        prune.prune_model(model, "wanda", 0.5)
    with pytest.raises(ValueError, match="multiples of 4; blocks.0.attn.q_proj has 42"):
        prune.prune_model(llama(n_embd=42, n_head=3, n_kv_head=1), "magnitude", pattern="2:4")
    with pytest.raises(ValueError, match="prune the full-precision model, then quantize"):
        prune.prune_model(quantize_model(llama(), "int8"), "magnitude", 0.5)
    adapted = llama()
    attach(adapted, "all-linear", r=2)
    with pytest.raises(ValueError, match="merge them first"):
        prune.prune_structured(adapted, CALIBRATION, mlp_fraction=0.25)
    with pytest.raises(ValueError, match="nothing to remove"):
        prune.prune_structured(model, CALIBRATION)
    with pytest.raises(ValueError, match="removes 0 of 3 heads per key/value group: choose a multiple of 1/3"):
        prune.prune_structured(model, CALIBRATION, head_fraction=0.1)
    gpt2 = GPT(GPTConfig.gpt2(vocab_size=96, block_size=32, n_layer=1, n_head=4, n_embd=32))
    with pytest.raises(ValueError, match="prune MLP neurons only"):
        prune.prune_structured(gpt2, CALIBRATION, head_fraction=0.25)


def _kept(original: torch.Tensor, kept: torch.Tensor, size: int) -> list[int]:
    """Which `size`-row slices of `original` survive in `kept` (found by value: independent of the pruning code)."""
    rows = original.reshape(-1, size, original.shape[-1])
    return [i for i in range(rows.shape[0]) if any(torch.equal(rows[i], r) for r in kept.reshape(-1, size, kept.shape[-1]))]


@pytest.mark.parametrize("n_kv_head", [2, 6])  # grouped-query attention, and one key/value head per query head
def test_structured_pruning_equals_the_dense_model_with_those_units_switched_off(n_kv_head, tmp_path):
    model = llama(n_kv_head=n_kv_head)
    small = prune.prune_structured(model, CALIBRATION, mlp_fraction=0.25, head_fraction=1 / 3)
    c = small.config
    assert (c.d_ff, c.n_head, c.n_kv_head, c.head_dim) == (48, 4, 2 if n_kv_head == 2 else 4, 8)
    off = copy.deepcopy(model)
    with torch.no_grad():
        for big, little in zip(off.blocks, small.blocks):
            neurons = _kept(big.mlp.up_proj.weight, little.mlp.up_proj.weight, 1)
            heads = _kept(big.attn.q_proj.weight, little.attn.q_proj.weight, 8)
            assert len(neurons) == 48 and len(heads) == 4
            if n_kv_head == 2:
                assert [h // 3 for h in heads] == [0, 0, 1, 1]  # the same number of query heads kept in each group
            dropped_neurons = [j for j in range(64) if j not in neurons]
            big.mlp.down_proj.weight[:, dropped_neurons] = 0
            for h in set(range(6)) - set(heads):
                big.attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(small(x)[0], off(x)[0], atol=1e-5, rtol=0)
    # transformers and our loader both rebuild it from its config
    hf_bridge.to_hf(small).save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path).eval()(x).logits, small(x)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(hf_bridge.from_hf(tmp_path).eval()(x)[0], small(x)[0], atol=1e-5, rtol=0)
    assert small.num_params() == small.config.shape().n_params < model.num_params()


def test_structured_pruning_removes_the_lowest_scoring_neurons():
    model = llama()
    small = prune.prune_structured(model, CALIBRATION, mlp_fraction=0.5)
    block, rope = model.blocks[0], (model.rope_cos[:24][None, None], model.rope_sin[:24][None, None])
    with torch.no_grad():
        x = model.wte(CALIBRATION)
        h = block.norm2(x + block.attn(block.norm1(x), rope, None, None, 0))
        mlp_in = F.silu(model.blocks[0].mlp.gate_proj(h)) * model.blocks[0].mlp.up_proj(h)
    score = _direct_norms(mlp_in) * model.blocks[0].mlp.down_proj.weight.abs().sum(0)
    kept = _kept(model.blocks[0].mlp.up_proj.weight, small.blocks[0].mlp.up_proj.weight, 1)
    assert sorted(kept) == sorted(score.topk(32).indices.tolist())


def test_ties_at_the_threshold_still_remove_exactly_the_share_asked():
    """SmolLM2's weights sit on a 4-bit grid: many equal |w|. The count stays exact and no kept weight is below a dropped one."""
    scores = torch.randint(0, 5, (40, 30), generator=torch.Generator().manual_seed(0)).float()
    mask = prune.unstructured_mask(scores, 0.5, per_row=False)
    assert int((~mask).sum()) == 600 and scores[mask].min() >= scores[~mask].max()
