import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from llmnb import quantize as q
from llmnb.model import GPT, GPTConfig

warnings.filterwarnings("ignore", module="torchao")


def test_nf4_levels_built_from_normal_quantiles_equal_bitsandbytes_table():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    _, state = bnb_functional.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="nf4")
    levels = q.nf4_code()
    assert torch.allclose(levels, state.code.float(), atol=1e-6)
    assert levels[7] == 0 and levels[0] == -1 and levels[-1] == 1


def test_nf4_codes_block_scales_and_packed_bytes_equal_bitsandbytes_on_the_same_blocks():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(96, 128) * torch.linspace(0.1, 3, 128)  # columns of different scales: blocks get different absmaxes
    packed_theirs, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    codes, absmax = q.nf4_quantize(w, block=64)
    assert torch.allclose(absmax, state.absmax, rtol=1e-6)
    assert torch.equal(q.pack_nibbles(codes), packed_theirs.flatten())
    theirs = bnb_functional.dequantize_4bit(packed_theirs, state)
    assert torch.allclose(q.nf4_dequantize(codes, absmax, w.shape), theirs, atol=1e-5)
    # their packed bytes, read by our decoding (rows of whole blocks: where bitsandbytes' CPU dequantization agrees)
    assert torch.allclose(q.nf4_from_packed(packed_theirs, state.absmax, w.shape), theirs, atol=1e-5)


def test_double_quantization_keeps_block_scales_within_an_int8_step_and_saves_a_third_of_a_bit():
    torch.manual_seed(0)
    absmax = torch.rand(1000) * 3 + 0.5
    codes, scale, mean = q.double_quantize(absmax, block=256)
    back = q.double_dequantize(codes, scale, mean, block=256)
    assert codes.dtype == torch.int8 and scale.shape == (4,)
    assert (back - absmax).abs().max() <= scale.max() / 2 + 1e-6
    bits_per_weight = (codes.numel() * 8 + scale.numel() * 32 + 32) / (absmax.numel() * 64)
    assert bits_per_weight < 0.15 < 32 / 64  # vs 0.5 bits for fp32 scales of blocks of 64


@pytest.mark.cpu_paths
def test_int8_weights_equal_torchao_int8_weight_only_within_one_step():
    torchao = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=False)
    ours = q.QuantLinear.from_linear(linear, "int8").dequantized_weight()
    theirs = copy.deepcopy(linear)
    torchao.quantize_(theirs, torchao.Int8WeightOnlyConfig())
    theirs = theirs.weight.dequantize().float()
    step = linear.weight.abs().amax(1, keepdim=True) / 127
    assert ((ours - theirs).abs() <= step * 1.01).all()
    assert (ours - linear.weight).abs().max() <= step.max() * 0.51  # rounded with the bf16 scale itself: half a step


def test_absmax_zero_point_and_group_errors_shrink_as_the_scale_gets_local():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[0, 0] = 40.0  # one outlier
    per_tensor = q.absmax_quantize(w, dim=None)
    per_row = q.absmax_quantize(w, dim=-1)
    err = lambda pair: ((pair[0].float() * pair[1] - w) ** 2).mean()  # noqa: E731
    assert err(per_row) < err(per_tensor) / 5
    shifted = w[1:] + 3.0  # not centred on zero: the zero point uses the whole range
    qz, scale, zero = q.zeropoint_quantize(shifted, dim=-1)
    sym = q.absmax_quantize(shifted, dim=-1)
    assert ((qz.float() - zero) * scale - shifted).abs().mean() < (sym[0].float() * sym[1] - shifted).abs().mean()
    q4, s4, lo = q.int4_quantize(w[1:], group_size=32)
    assert q4.max() <= 15 and ((q.int4_dequantize(q4, s4, lo, 32) - w[1:]).abs() <= s4.repeat_interleave(32, 1) / 2 + 1e-6).all()


def test_a_group_size_that_does_not_divide_the_layer_is_refused_naming_it_and_the_sizes_that_work():
    model = GPT(GPTConfig.llama(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=96))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj: group_size=64 does not divide its 96 inputs; use one of \[32\]"):
        q.quantize_model(model, "int4", group_size=64)
    assert isinstance(model.blocks[0].attn.q_proj, torch.nn.Linear), "nothing is replaced when one layer is refused"


@pytest.mark.cpu_paths
@pytest.mark.parametrize("scheme, tol", [("int8", 0.01), ("int8-dynamic", 0.02), ("int4", 0.01), ("nf4", 1e-5)])
def test_each_layer_computes_with_the_weight_it_stores(scheme, tol):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96)
    layer = q.QuantLinear.from_linear(linear, scheme, group_size=32)
    x = torch.randn(5, 128)
    with torch.no_grad():
        expected = F.linear(x, layer.dequantized_weight(), linear.bias)
        got = layer(x)
        assert (got - expected).abs().max() <= tol * expected.abs().max()
        assert (got - linear(x)).abs().max() <= 0.15 * linear(x).abs().max(), "and close to the full-precision layer"


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    return GPT(GPTConfig.llama(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, tie_embeddings=True)).eval()


@pytest.mark.cpu_paths
@pytest.mark.parametrize("scheme", q.SCHEMES)
def test_quantized_models_stay_close_to_full_precision_and_shrink(tiny_llama, scheme):
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        full = tiny_llama(ids)[0].log_softmax(-1)
        model = q.quantize_model(copy.deepcopy(tiny_llama), scheme, group_size=32)
        quant = model(ids)[0].log_softmax(-1)
    kl = F.kl_div(quant, full, log_target=True, reduction="batchmean") / ids.shape[1]
    assert kl < (0.01 if scheme.startswith("int8") else 0.05)
    ratio = q.model_bytes(model) / q.model_bytes(tiny_llama)
    assert ratio < (0.3 if scheme.startswith("int8") else 0.2)
    assert model.wte._source() is model.lm_head, "the tied embedding reads the head's int8 matrix: stored once"


def test_saved_quantized_models_load_back_identical_and_refuse_another_scheme(tmp_path, tiny_llama, chat_tokenizer):
    model = q.quantize_model(copy.deepcopy(tiny_llama), "int4", group_size=32)
    folder = q.save_quantized(model, chat_tokenizer, tmp_path / "m")
    back, tokenizer = q.load_quantized(folder)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], back(ids)[0])
    assert len(tokenizer) == len(chat_tokenizer)
    from llmnb.checkpoint import load

    assert load(folder)[0].quantization == {"scheme": "int4", "group_size": 32}, "the one loader takes quantized folders too"
    with pytest.raises(ValueError, match="holds int4 weights, not int8"):
        q.load_quantized(folder, scheme="int8")
    with pytest.raises(FileNotFoundError, match="not a quantized llmnb model"):
        q.load_quantized(tmp_path)


def test_a_quantized_folder_loads_without_importing_the_compiler(tmp_path, tiny_llama, chat_tokenizer):
    """The skeleton load_quantized fills is built without the meta device: PyTorch's reference ops for meta tensors
    import torch._dynamo and sympy, about 70 MB that a server loading int8 SmolLM2 kept resident."""
    import subprocess
    import sys

    folder = q.save_quantized(q.quantize_model(copy.deepcopy(tiny_llama), "int8"), chat_tokenizer, tmp_path / "m")
    code = ("import sys; from llmnb.quantize import load_quantized; load_quantized(sys.argv[1]); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def test_quantizing_twice_or_with_adapters_is_refused(tiny_llama):
    from llmnb import lora

    model = q.quantize_model(copy.deepcopy(tiny_llama), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        q.quantize_model(model, "int8")
    adapted = copy.deepcopy(tiny_llama)
    lora.attach(adapted, r=2)
    with pytest.raises(ValueError, match="merge them first"):
        q.quantize_model(adapted, "int8")
    with pytest.raises(ValueError, match="unknown scheme"):
        q.quantize_model(copy.deepcopy(tiny_llama), "int3")


@pytest.mark.cpu_paths
def test_a_quantized_model_generates_with_the_kv_cache(tiny_llama):
    from llmnb.generate import generate

    model = q.quantize_model(copy.deepcopy(tiny_llama), "int8")
    ids = torch.randint(0, 256, (2, 5))
    cached = generate(model, ids, 6, temperature=0)
    uncached = generate(model, ids, 6, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


def _has_avx512bf16() -> bool:
    return bool(pytest.importorskip("bitsandbytes.functional").has_avx512bf16())


@pytest.mark.parametrize("packed", [False, True], ids=["generic", "packed-bf16"])
def test_bitsandbytes_nf4_layers_compute_their_own_dequantized_weight_on_each_cpu_path(packed):
    """Each of bitsandbytes' two CPU inference paths against F.linear on the weight bitsandbytes itself dequantizes.
    The generic path dequantizes and multiplies in fp32: equal to fp32 rounding. The packed path rounds activations and
    block scales to bf16 (8 significant bits each), so its bound is derived from that: 2 x 2^-8 x (|x| @ |W|^T)."""
    if packed and not _has_avx512bf16():
        pytest.skip("this processor has no AVX-512 BF16: bitsandbytes' packed CPU path exists only on one that has it")
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    model = GPT(GPTConfig.llama(vocab_size=96, block_size=32, n_layer=1, n_head=4, n_kv_head=2, n_embd=64)).eval()
    ref = q.reference_model(model, "bnb-nf4", bnb_packed=packed)
    assert q.bnb_cpu_paths(ref) == {q.BNB_PATHS[packed]: 7}
    x = torch.randn(5, 64)
    for name, layer in q._quantizable(ref):
        if layer.in_features != 64:
            continue
        w = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        expected = F.linear(x, w)
        with torch.no_grad():
            got = layer(x)
        assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) == packed, name
        bound = (2 * 2**-8 * (x.abs() @ w.abs().T) + 1e-5) if packed else 1e-5 * (1 + expected.abs())
        assert ((got - expected).abs() <= bound).all(), f"{name}: worst {float((got - expected).abs().max()):.2e}"


def test_bitsandbytes_keeps_layers_its_packed_layout_cannot_hold_on_the_generic_path():
    """bitsandbytes 0.50 crashes when it packs a layer narrower than its 64-wide block (a 32-wide model on a CPU with
    AVX-512 BF16): reference_model keeps such layers on the generic path, and says why when the packed one is asked for."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.llama(vocab_size=96, block_size=32, n_layer=1, n_head=4, n_kv_head=2, n_embd=32)).eval()
    ref = q.reference_model(model, "bnb-nf4")
    with torch.no_grad():
        got = ref(torch.randint(0, 96, (2, 12)))[0]
    assert torch.isfinite(got).all()
    assert q.BNB_PATHS[False] in q.bnb_cpu_paths(ref)  # at least the 32-wide attention layers
    assert not q.bnb_packed_fits(32, 32) and q.bnb_packed_fits(64, 32) and not q.bnb_packed_fits(64, 48)
    reason = "blocks.0.attn.q_proj is 32 -> 32: inputs must be a multiple of 64" if _has_avx512bf16() else "this processor has no AVX-512 BF16"
    with pytest.raises(ValueError, match=reason):
        q.reference_model(model, "bnb-nf4", bnb_packed=True)
