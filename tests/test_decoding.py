"""The fast decoding path computes what the model computes: packed weights = plain weights, bf16 chosen only where native."""
import copy
import os

import pytest
import torch
import torch.nn as nn

from llmnb import decoding, hardware
from llmnb.generate import generate, generate_stream
from llmnb.lora import attach
from llmnb.model import GPT, GPTConfig
from llmnb.quantize import QuantLinear, model_bytes, quantize_model

cpu_paths = pytest.mark.cpu_paths  # oneDNN's kernels differ with the processor: run again on the lower path


def _models() -> dict[str, GPT]:
    torch.manual_seed(0)
    return {"gpt2": GPT(GPTConfig.gpt2(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64)).eval(),
            "llama": GPT(GPTConfig.llama(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                         tie_embeddings=True)).eval()}


def _biased(model: GPT) -> GPT:
    """Non-zero biases (GPT-2's start at zero), so that a layer dropping its bias shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    return model


@cpu_paths
@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_packed_weights_compute_what_the_plain_ones_do(flavour):
    model = _biased(_models()[flavour])
    x = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        logits = model(x)[0]
    tokens, logprobs = generate(model, x[:, :5], 12, temperature=0, return_logprobs=True)
    fast = decoding.prepare(copy.deepcopy(model), torch.float32)
    assert fast.decoding.packed == 4 * 2 and isinstance(fast.blocks[0].mlp.down_proj, decoding.PackedLinear)  # qkv, o, (gate_)up, down
    assert fast.decoding.fused == 2 * (1 + (flavour == "llama")) and fast.blocks[1].attn.q_proj is None
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[0], logits, atol=2e-5, rtol=0)
    fast_tokens, fast_logprobs = generate(fast, x[:, :5], 12, temperature=0, return_logprobs=True)
    assert torch.equal(fast_tokens, tokens)
    torch.testing.assert_close(fast_logprobs, logprobs, atol=2e-5, rtol=0)


@cpu_paths
@pytest.mark.skipif(not decoding.packable(torch.bfloat16), reason="oneDNN packs bf16 from AVX-512 up")
def test_bf16_packed_agrees_with_plain_bf16_within_bf16_rounding():
    model = _biased(_models()["gpt2"])
    plain = copy.deepcopy(model).to(torch.bfloat16)
    fast = decoding.prepare(copy.deepcopy(model), torch.bfloat16)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a, b, exact = plain(x)[0].float(), fast(x)[0].float(), model(x)[0]
    assert fast.blocks[0].attn.qkv.packed.dtype == torch.bfloat16 and fast.lm_head.weight.dtype == torch.bfloat16
    assert (a - b).abs().max() < 0.05 and (b - exact).abs().max() < 0.1  # logits of order 1; bf16 keeps 8 bits


@pytest.mark.parametrize("scheme", [None, "int8", "int8-dynamic"])
def test_stacked_layers_compute_their_parts_side_by_side(scheme):
    """Stacked rows give each part's own output, bias included (plain and int8 codes with their row scales); layers
    of another kind, or of two kinds, are left apart."""
    torch.manual_seed(0)
    parts = [_biased(nn.Linear(64, n, bias=True)) for n in (32, 16, 16)]
    if scheme:
        parts = [QuantLinear.from_linear(m, scheme) for m in parts]
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(decoding.stacked(parts)(x), torch.cat([m(x) for m in parts], -1), atol=1e-6, rtol=0)
    assert decoding.stacked([parts[0], nn.Linear(64, 8) if scheme else QuantLinear.from_linear(parts[1], "int8")]) is None
    assert decoding.stacked([quantize_model(_models()["gpt2"], "int4").blocks[0].attn.q_proj] * 2) is None


def test_a_row_linear_compiled_computes_the_layer_and_eagerly_is_the_layer():
    """Compiled at one row it is a reduction (fp32 sums, bias added); eagerly, and at more rows, F.linear itself; it
    holds the layer's own parameters."""
    torch.manual_seed(0)
    linear = _biased(nn.Linear(48, 40))
    row = decoding.RowLinear(linear)
    assert row.weight is linear.weight and row.bias is linear.bias
    x = torch.randn(1, 1, 48)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(row, fullgraph=True)(x), linear(x), atol=1e-6, rtol=0)
        assert torch.equal(row(x), linear(x)) and torch.equal(row(x.expand(3, 2, 48)), linear(x.expand(3, 2, 48)))
    model = _models()["llama"]
    assert decoding.row_linears(model) == 2 * 7 + 1 and model.lm_head.weight is model.wte.weight


def test_a_tied_head_stays_tied_and_no_matrix_is_stored_twice():
    model = _models()["llama"]
    fast = decoding.prepare(copy.deepcopy(model), torch.float32)
    assert fast.lm_head.weight is fast.wte.weight and type(fast.lm_head) is nn.Linear
    plain_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())
    assert model_bytes(fast) == plain_bytes  # packed matrices replace the plain ones
    assert not any(isinstance(m, nn.Linear) and m is not fast.lm_head for m in fast.modules())


@cpu_paths
def test_quantized_layers_compute_in_the_prepared_dtype():
    model = quantize_model(_models()["llama"], "int8")
    x = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        before = model(x)[0]
    decoding.prepare(model, torch.bfloat16)
    with torch.no_grad():
        after = model(x)[0]
    assert after.dtype == torch.bfloat16 and (after.float() - before).abs().max() < 0.1
    assert generate(model, x, 4, temperature=0).shape == (2, 11)


def test_bf16_only_where_the_processor_has_it(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert hardware.decoding_dtype("cpu")[0] == torch.bfloat16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # another user's processor, as tests/test_cpu_paths.py takes it
    dtype, why = hardware.decoding_dtype("cpu")
    assert dtype == torch.float32 and "ONEDNN_MAX_CPU_ISA" in why
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert hardware.decoding_dtype("cpu")[0] == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert hardware.decoding_dtype("cpu") == (torch.float32, "fp32: the processor has no AVX-512 BF16 or AMX")


def test_without_onednn_the_layers_stay_plain(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    fast = decoding.prepare(_models()["gpt2"], torch.float32)
    assert fast.decoding.packed == 0 and "plain layout" in str(fast.decoding)
    assert generate(fast, torch.tensor([[1, 2, 3]]), 3, temperature=0).shape == (1, 6)


def test_where_onednn_cannot_pack_bf16_an_asked_for_bf16_stays_plain():
    """Below AVX-512 oneDNN refuses to pack bf16 weights (an error, before `packable`): capped at AVX2 in a fresh
    process, a model asked to decode in bf16 keeps the plain layout, says so and generates."""
    import subprocess
    import sys

    code = ("import torch; from llmnb import decoding; from llmnb.generate import generate; from llmnb.model import GPT, GPTConfig; "
            "m = decoding.prepare(GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval(), torch.bfloat16); "
            "print(decoding.packable(torch.bfloat16), decoding.packable(torch.float32), m.decoding.packed, "
            "tuple(generate(m, torch.tensor([[1, 2]]), 3, temperature=0).shape))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "0", "(1,", "5)"], out.stdout


def test_what_a_prepared_model_refuses():
    fast = decoding.prepare(_models()["gpt2"], torch.float32)
    with pytest.raises(RuntimeError, match="save the model before"):
        fast.state_dict()
    with pytest.raises(TypeError, match="packed in torch.float32"):
        fast.blocks[0].attn.qkv(torch.ones(1, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype must be"):
        decoding.prepare(_models()["gpt2"], "int8")
    adapted = _models()["gpt2"]
    attach(adapted, ["q_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="merge them first"):
        decoding.prepare(adapted)


@cpu_paths  # Inductor writes its C++ for the processor's vector ISA (AVX-512, AVX2 or none, from ATEN_CPU_CAPABILITY)
def test_a_compiled_step_decodes_what_the_eager_model_does(monkeypatch):
    """Left-padded prompts of two lengths (so positions and masks differ per row), greedy: the same tokens, log-probabilities
    within 1e-5; prompts of another length in the same cache bucket reuse the graph; a compiler failure falls back."""
    model = _models()["llama"]
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])
    eager = generate(model, ids, 10, temperature=0, attention_mask=mask, return_logprobs=True)
    fast = decoding.prepare(copy.deepcopy(model), torch.float32, compile=True)
    step = fast.decoding.step
    assert "compiled graph" in str(fast.decoding) and fast.decoding.packed == 0
    compiled = generate(fast, ids, 10, temperature=0, attention_mask=mask, return_logprobs=True)
    assert torch.equal(compiled[0], eager[0]) and not step.failed
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-5, rtol=0)
    assert step.shapes == {(2, 64)} and step.compile_seconds > 0
    seconds = step.compile_seconds
    assert torch.equal(generate(fast, ids[:, 2:], 12, temperature=0, attention_mask=mask[:, 2:]),
                       generate(model, ids[:, 2:], 12, temperature=0, attention_mask=mask[:, 2:]))
    assert step.shapes == {(2, 64)} and step.compile_seconds == seconds  # 7 + 12 tokens: the same bucket, no new graph

    def broken(*args):
        raise RuntimeError("compiler crashed\nsecond line")

    monkeypatch.setattr(step.compiled, "graph", broken)
    with pytest.warns(UserWarning, match="compiled step failed .RuntimeError: compiler crashed.; decoding eagerly"):
        again = generate(fast, ids, 10, temperature=0, attention_mask=mask)
    assert torch.equal(again, eager[0]) and "eager: RuntimeError" in str(fast.decoding)


def test_a_step_at_fixed_addresses_keeps_two_interleaved_generations_apart():
    """What a CUDA graph needs (the cache at the addresses it recorded), checked here on the CPU: each generation's cache
    is copied into the step's one buffer per shape, and one that held it before gets its own copy back first."""
    model = _models()["llama"]
    fast = decoding.prepare(copy.deepcopy(model), torch.float32, compile=True)
    step = fast.decoding.step
    assert not step.fixed_addresses and not step.compiled.cuda_graphs  # on a CPU, off: nothing to replay
    step.fixed_addresses = True
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    alone = [generate(model, ids, 8, temperature=0, return_logprobs=True) for ids in (a, b)]
    streams = [generate_stream(fast, ids, 8, temperature=0) for ids in (a, b)]
    taken = [[], []]
    for _ in range(8):
        for stream, out in zip(streams, taken):  # one token of each in turn: each step takes the buffer from the other
            out.append(next(stream))
    for (tokens, logprobs), out in zip(alone, taken):
        assert torch.equal(torch.stack([t for t, _ in out], 1), tokens[:, -8:])
        torch.testing.assert_close(torch.stack([p for _, p in out], 1), logprobs, atol=1e-5, rtol=0)
    (_, buffers), = step.buffers.values()
    generate(fast, a, 8, temperature=0)
    assert list(step.buffers) == [(1, 2, 64, 16)] and step.buffers[(1, 2, 64, 16)][1] is buffers  # allocated once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the lent H200: benchmarks/README.md)")
def test_on_a_gpu_the_compiled_step_replays_one_cuda_graph_and_decodes_what_eager_does():
    model = _models()["llama"].cuda()
    ids = torch.randint(0, 97, (2, 9), device="cuda")
    mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9], device="cuda")
    eager = generate(model, ids, 10, temperature=0, attention_mask=mask, return_logprobs=True)
    fast = decoding.prepare(copy.deepcopy(model), torch.float32, compile=True)
    assert "replayed as a CUDA graph" in str(fast.decoding)
    torch._dynamo.utils.counters.clear()
    compiled = generate(fast, ids, 10, temperature=0, attention_mask=mask, return_logprobs=True)
    assert not fast.decoding.step.failed and torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-4, rtol=0)
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]  # Inductor would say why it did not record
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        again = generate(fast, ids, 10, temperature=0, attention_mask=mask)
    launches = {e.key: e.count for e in profile.key_averages() if e.key in ("cudaGraphLaunch", "cuLaunchKernel", "cudaLaunchKernel")}
    assert torch.equal(again, eager[0]) and launches.get("cudaGraphLaunch", 0) >= 9, launches  # one graph per step


def test_without_a_compiler_the_step_runs_eagerly_and_says_so(monkeypatch):
    monkeypatch.setattr(decoding.shutil, "which", lambda name: None)
    fast = decoding.prepare(_models()["gpt2"], torch.float32, compile=True)
    assert "eager: no C++ compiler" in str(fast.decoding)
    assert torch.equal(generate(fast, torch.tensor([[1, 2, 3]]), 5, temperature=0),
                       generate(_models()["gpt2"], torch.tensor([[1, 2, 3]]), 5, temperature=0))


@cpu_paths
@pytest.mark.long  # 40 s with a cold Inductor cache: autotuning times every product's candidate kernels
def test_an_int8_model_compiled_with_autotuned_gemms_decodes_what_it_does_eagerly():
    """The compiled step autotunes its products (Inductor's C++ GEMM templates against ATen's kernels, the weight-only
    int8 product included): the same greedy tokens as the int8 model run eagerly in bf16, log-probabilities within
    bf16 rounding (one ulp of a logit of order 1 is 0.008)."""
    model = quantize_model(_biased(_models()["llama"]), "int8")
    ids = torch.randint(0, 97, (2, 7))
    eager = decoding.prepare(copy.deepcopy(model), torch.bfloat16)
    fast = decoding.prepare(copy.deepcopy(model), torch.bfloat16, compile=True)
    autotuned = decoding.gemm_templates_safe()  # AVX-512: the templates; AVX2 (the lower path): ATen's kernels
    assert fast.decoding.step.compiled.autotune == autotuned and ("autotuned" in str(fast.decoding)) == autotuned
    tokens, logprobs = generate(eager, ids, 10, temperature=0, return_logprobs=True)
    fast_tokens, fast_logprobs = generate(fast, ids, 10, temperature=0, return_logprobs=True)
    assert not fast.decoding.step.failed and torch.equal(fast_tokens, tokens)
    torch.testing.assert_close(fast_logprobs, logprobs, atol=0.03, rtol=0)
