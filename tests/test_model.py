import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from llmnb import model as M
from llmnb.models import resolve_model

CONFIGS = {
    "gpt2": M.GPTConfig.gpt2(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64),
    "llama-gqa": M.GPTConfig.llama(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, rope_theta=500.0),
    "llama-tied-bias": M.GPTConfig.llama(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64, tie_embeddings=True, bias=True),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request):
    torch.manual_seed(0)
    ours = M.GPT(CONFIGS[request.param]).eval()
    return ours, M.to_hf(ours)


def test_logits_match_transformers(pair):
    ours, hf = pair
    x = torch.randint(0, 320, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-5, rtol=0)


def test_round_trip_through_a_saved_folder(pair, tmp_path):
    ours, _ = pair
    M.to_hf(ours, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    back = M.from_hf(str(tmp_path))
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ours(x)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(back(x)[0], ours(x)[0], atol=0, rtol=0)


def test_greedy_generation_matches_transformers_single_and_left_padded(pair):
    ours, hf = pair
    x = torch.randint(1, 320, (2, 8))
    assert torch.equal(ours.generate(x[:1], 12, temperature=0), hf.generate(x[:1], max_new_tokens=12, do_sample=False, pad_token_id=0))
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[1:, :5]], dim=1)
    ids = torch.cat([x[:1], ids])
    mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    ours_out = ours.generate(ids, 10, temperature=0, attention_mask=mask)
    assert torch.equal(ours_out, hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0))
    alone = ours.generate(x[1:, :5], 10, temperature=0)
    assert torch.equal(ours_out[1, 8:], alone[0, 5:]), "padding must not change a row's continuation"


def test_cache_math_path_and_no_cache_agree(pair):
    ours, _ = pair
    x = torch.randint(0, 320, (2, 6))
    assert torch.equal(ours.generate(x, 15, temperature=0), ours.generate(x, 15, temperature=0, use_cache=False))
    math = M.GPT(M.GPTConfig(**{**ours.config.__dict__, "attention": "math"})).eval()
    math.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(math(x)[0], ours(x)[0], atol=1e-5, rtol=0)


def test_continuing_a_cache_with_several_tokens_matches_a_full_pass(pair):
    ours, _ = pair
    x = torch.randint(0, 320, (2, 12))
    cache = M.KVCache(ours.config, 2, 12, "cpu", torch.float32)
    with torch.no_grad():
        ours(x[:, :7], cache=cache)
        tail = ours(x[:, 7:], cache=cache)[0]
        torch.testing.assert_close(tail, ours(x)[0][:, 7:], atol=1e-5, rtol=0)


def test_accounting_agrees_with_the_budget_and_a_real_cache(pair):
    ours, hf = pair
    shape = ours.config.shape()
    assert ours.num_params() == shape.n_params == sum(p.numel() for p in hf.parameters())
    assert sum(ours.num_params(by_component=True).values()) == ours.num_params()
    cache = M.KVCache(ours.config, 1, 10, "cpu", torch.float32)
    assert cache.nbytes() == 10 * ours.kv_cache_bytes_per_token("fp32")
    assert ours.flops_per_token(32, training=True) == 3 * shape.flops_per_token(32)


def test_sampling_filters_match_transformers_processors():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    seq = torch.randint(0, 50, (3, 7))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seq, logits.clone())
    kept = torch.isfinite(TopPLogitsWarper(0.8)(seq, TopKLogitsWarper(10)(seq, ref.clone() / 0.7)))
    for row in range(3):
        draws = {int(M._sample(logits[row:row + 1], seq[row:row + 1], 0.7, 10, 0.8, 1.3, torch.Generator().manual_seed(s))) for s in range(200)}
        assert draws <= set(kept[row].nonzero().flatten().tolist()), "sampled a token that transformers' filters drop"
    greedy = M._sample(logits, seq, 0.0, None, None, 1.3, None)
    assert torch.equal(greedy, ref.argmax(-1))


def test_seeded_sampling_is_repeatable_and_top_k_1_is_greedy(pair):
    ours, _ = pair
    x = torch.randint(0, 320, (2, 5))
    a = ours.generate(x, 20, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(a, ours.generate(x, 20, temperature=1.0, top_p=0.9, seed=7))
    assert not torch.equal(a, ours.generate(x, 20, temperature=1.0, top_p=0.9, seed=8))
    assert torch.equal(ours.generate(x, 10, top_k=1, seed=3), ours.generate(x, 10, temperature=0))


def test_stop_tokens_and_streaming(pair):
    ours, _ = pair
    x = torch.randint(0, 320, (2, 5))
    greedy = ours.generate(x, 20, temperature=0)
    stop = int(greedy[0, 7])  # a token row 0 produces
    out = ours.generate(x, 20, temperature=0, stop_tokens=[stop])
    first = (out[0, 5:] == stop).nonzero()[0].item()
    assert torch.equal(out[0, 5:5 + first], greedy[0, 5:5 + first])
    streamed = []
    full = ours.generate(x, 6, temperature=0, on_token=streamed.append)
    assert torch.equal(torch.stack(streamed, 1), full[:, 5:])
    assert len(list(ours.generate_stream(x, 6, temperature=0))) == 6


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature"),
    ({"top_k": 0}, "top_k"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_bad_sampling_arguments_raise_clear_errors(pair, kwargs, message):
    ours, _ = pair
    with pytest.raises(ValueError, match=message):
        ours.generate(torch.zeros(1, 3, dtype=torch.long), 2, **kwargs)


def test_bad_lengths_and_configs_raise_clear_errors(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="exceeds the context"):
        ours.generate(torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="non-negative"):
        ours.generate(torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="at least one token"):
        ours.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="divisible by n_head"):
        M.GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        M.GPTConfig.llama(n_embd=64, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="unknown flavour"):
        M.GPTConfig(flavour="mamba")


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    big = M.GPT(M.GPTConfig.gpt2(vocab_size=100, block_size=16, n_layer=8, n_head=4, n_embd=256))
    assert big.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert big.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    path = resolve_model("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return M.from_hf(hf), hf, AutoTokenizer.from_pretrained(path)


def test_smollm2_logits_and_chat_reply_match_transformers(smollm2):
    ours, hf, tokenizer = smollm2
    assert ours.config.n_kv_head == 3 and ours.config.rope_theta == 100000.0 and ours.config.tie_embeddings
    x = torch.randint(0, ours.config.vocab_size, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-4, rtol=0)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    mine = ours.generate(ids, 24, temperature=0, stop_tokens=[tokenizer.eos_token_id])
    theirs = hf.generate(ids, max_new_tokens=24, do_sample=False)
    assert mine.tolist() == theirs.tolist()
    assert "Paris" in tokenizer.decode(mine[0, ids.shape[1]:])


def test_decoding_layout_changes_memory_order_not_results(pair):
    ours, _ = pair
    x = torch.randint(0, 320, (1, 6))
    before = ours.generate(x, 8, temperature=0)
    with torch.no_grad():
        logits = ours(x)[0]
    twin = M.GPT(ours.config).eval()
    twin.load_state_dict(ours.state_dict())
    twin.for_decoding()
    assert not twin.blocks[0].attn.qkv.weight.is_contiguous() and twin.blocks[0].attn.qkv.weight.t().is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(twin(x)[0], logits, atol=1e-5, rtol=0)
    assert torch.equal(twin.generate(x, 8, temperature=0), before)
