import pytest
import torch
from transformers import AutoModelForCausalLM

from llmnb import hf_bridge as B
from llmnb import model as M
from llmnb.checkpoint import resolve_model
from llmnb.generate import generate

@pytest.mark.cpu_paths
def test_logits_match_transformers(pair):
    ours, hf = pair
    x = torch.randint(0, 320, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-5, rtol=0)


def test_round_trip_through_a_saved_folder(pair, tmp_path):
    ours, _ = pair
    B.to_hf(ours, tmp_path, tokenizer=_tokenizer())
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    back = B.from_hf(str(tmp_path))
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ours(x)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(back(x)[0], ours(x)[0], atol=0, rtol=0)


def test_a_folder_is_read_without_building_the_transformers_model(pair, tmp_path, monkeypatch):
    """A folder save_pretrained wrote is read straight from its safetensors file (no second fp32 copy of the weights
    in a transformers model); one under other names (GPT-2's hub file has no `transformer.` prefix) goes through
    transformers, which knows them, and loads the same weights."""
    from safetensors.torch import load_file, save_file

    ours, _ = pair
    B.to_hf(ours, tmp_path, tokenizer=_tokenizer())
    x = torch.randint(0, 320, (2, 16))
    built, original = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: built.append(a) or original(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(B.from_hf(tmp_path)(x)[0], ours(x)[0], atol=0, rtol=0)
        assert built == []
        state = load_file(tmp_path / "model.safetensors")
        save_file({k.removeprefix("transformer."): v for k, v in state.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
        renamed = any(k.startswith("transformer.") for k in state)  # GPT-2's names carry the prefix, Llama's do not
        torch.testing.assert_close(B.from_hf(tmp_path)(x)[0], ours(x)[0], atol=0, rtol=0)
        assert len(built) == renamed


def test_a_config_file_reads_as_transformers_reads_it(pair, tmp_path):
    """read_config (JSON, no transformers) gives the GPTConfig that transformers' config classes give: for a saved
    folder, SmolLM2's file, and files that leave out every field transformers fills with a default."""
    import json

    from transformers import AutoConfig

    ours, _ = pair
    B.to_hf(ours, tmp_path, tokenizer=_tokenizer())
    folders = [tmp_path, resolve_model("smollm2-135m-instruct")]
    for folder in folders:
        assert B.read_config(folder) == B.config_from_hf(AutoConfig.from_pretrained(folder)), folder
    values = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": values["model_type"]}))
    assert B.read_config(tmp_path) == B.config_from_hf(AutoConfig.from_pretrained(tmp_path))
    if values["model_type"] == "llama":  # RoPE scaling in the older form: transformers reads it (and from_hf refuses it)
        (tmp_path / "config.json").write_text(json.dumps({**values, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
        assert B.read_config(tmp_path) is None


def test_continuing_a_cache_with_several_tokens_matches_a_full_pass(pair):
    ours, _ = pair
    x = torch.randint(0, 320, (2, 12))
    cache = M.KVCache(ours.config, 2, 12, "cpu", torch.float32)
    with torch.no_grad():
        ours(x[:, :7], cache=cache)
        tail = ours(x[:, 7:], cache=cache)[0]
        torch.testing.assert_close(tail, ours(x)[0][:, 7:], atol=1e-5, rtol=0)


def test_one_query_attention_equals_sdpa_on_repeated_heads():
    """Decoding's grouped attention against PyTorch's SDPA over keys and values repeated per query head, in float64:
    a head that read the wrong key/value head, a mask ignored or a missing scale would each differ by far more."""
    torch.manual_seed(0)
    b, nh, n_kv, length, hs = 3, 6, 2, 9, 8
    q, k, v = torch.randn(b, nh, 1, hs, dtype=torch.float64), *torch.randn(2, b, n_kv, length, hs, dtype=torch.float64)
    mask = (torch.arange(length) <= torch.tensor([8, 4, 0])[:, None])[:, None, None, :]  # (B, 1, 1, L): rows of unequal lengths
    group = nh // n_kv
    for m in (mask, None):
        want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=m)
        torch.testing.assert_close(M.attention_one_query(q, k, v, m), want, atol=1e-12, rtol=0)
    half = M.attention_one_query(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), M.attention_one_query(q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(), mask),
                               atol=1e-2, rtol=0)  # fp32 inside: only the output's bf16 rounding


@pytest.mark.cpu_paths
def test_decoding_one_token_at_a_time_matches_transformers(pair):
    """Every step after the prompt takes the one-query path (t == 1); its logits are transformers' at each position."""
    ours, hf = pair
    x = torch.randint(0, 320, (2, 10))
    cache = M.KVCache(ours.config, 2, 10, "cpu", torch.float32)
    with torch.no_grad():
        steps = [ours(x[:, :4], cache=cache)[0][:, -1]] + [ours(x[:, i:i + 1], cache=cache)[0][:, -1] for i in range(4, 10)]
        torch.testing.assert_close(torch.stack(steps, 1), hf(x).logits[:, 3:], atol=1e-5, rtol=0)


def test_accounting_agrees_with_the_budget_and_a_real_cache(pair):
    ours, hf = pair
    shape = ours.config.shape()
    assert ours.num_params() == shape.n_params == sum(p.numel() for p in hf.parameters())
    assert sum(ours.num_params(by_component=True).values()) == ours.num_params()
    cache = M.KVCache(ours.config, 1, 10, "cpu", torch.float32)
    assert cache.nbytes() == 10 * ours.kv_cache_bytes_per_token("fp32")
    assert ours.flops_per_token(32, training=True) == 3 * shape.flops_per_token(32)


def test_bad_lengths_and_configs_raise_clear_errors(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="exceeds the context"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    cache = M.KVCache(ours.config, 1, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="KV cache holds 8 tokens; 10 asked for"):
        ours(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="divisible by n_head"):
        M.GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        M.GPTConfig.llama(n_embd=64, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="unknown flavour"):
        M.GPTConfig(flavour="mamba")
    for wrong in ({"bias": False}, {"tie_embeddings": False}, {"n_kv_head": 2}):  # what GPT2LMHeadModel cannot hold
        with pytest.raises(ValueError, match="use GPTConfig.llama"):
            M.GPTConfig.gpt2(vocab_size=64, n_layer=1, n_head=4, n_embd=32, **wrong)
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        M.GPTConfig.from_dict({"n_layer": 2, "n_experts": 8})
    with pytest.raises(ValueError, match="needs the tokenizer"):
        B.to_hf(ours, "/tmp/never-written")


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    big = M.GPT(M.GPTConfig.gpt2(vocab_size=100, block_size=16, n_layer=8, n_head=4, n_embd=256))
    assert big.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert big.blocks[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert big.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_empty_weights_builds_an_undrawn_skeleton_and_puts_init_back():
    init = torch.nn.init.normal_
    with pytest.raises(RuntimeError, match="inside"):
        with M.empty_weights():
            torch.manual_seed(0)
            state = torch.random.get_rng_state()
            skeleton = M.GPT(M.GPTConfig.llama(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
            assert torch.equal(torch.random.get_rng_state(), state), "a weight was drawn"
            raise RuntimeError("inside")
    assert torch.nn.init.normal_ is init, "nn.init is put back, even after an error"
    assert skeleton.rope_cos.abs().max() == 1.0  # what is computed, not drawn, is there
    skeleton.load_state_dict(M.GPT(skeleton.config).state_dict())  # and the rest is filled by a state dict


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    path = resolve_model("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return B.from_hf(hf), hf, AutoTokenizer.from_pretrained(path)


@pytest.mark.cpu_paths
def test_smollm2_logits_and_chat_reply_match_transformers(smollm2):
    ours, hf, tokenizer = smollm2
    assert ours.config.n_kv_head == 3 and ours.config.rope_theta == 100000.0 and ours.config.tie_embeddings
    x = torch.randint(0, ours.config.vocab_size, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-4, rtol=0)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    mine = generate(ours, ids, 24, temperature=0, stop_tokens=[tokenizer.eos_token_id])
    theirs = hf.generate(ids, max_new_tokens=24, do_sample=False)
    assert mine.tolist() == theirs.tolist()
    assert "Paris" in tokenizer.decode(mine[0, ids.shape[1]:])


def _tokenizer(vocab: int = 320):
    """A real byte-level tokenizer of `vocab` ids, for folders that must carry one."""
    from llmnb.checkpoint import bpe_as_hf
    from llmnb.tokenizer import ENDOFTEXT, train_bpe

    return bpe_as_hf(train_bpe(["to be or not to be, that is the question " * 40], vocab, special_tokens=[ENDOFTEXT]))


@pytest.mark.cpu_paths
def test_token_logprobs_equal_a_direct_computation_and_transformers(pair):
    ours, hf = pair
    torch.manual_seed(2)
    x = torch.randint(0, 320, (3, 20))
    mask = torch.ones_like(x)
    mask[1, 14:] = 0  # right padding
    with torch.no_grad():
        got = M.token_logprobs(ours, x, attention_mask=mask)
        logits = ours(x)[0].double()
        direct = torch.stack([torch.stack([logits[b, t].log_softmax(-1)[x[b, t + 1]] for t in range(19)]) for b in range(3)]).float()
        direct = direct * mask[:, 1:]
        torch.testing.assert_close(got, direct, atol=1e-5, rtol=0)
        torch.testing.assert_close(M.token_logprobs(hf, x, attention_mask=mask), got, atol=1e-5, rtol=0)
    assert got.shape == (3, 19) and (got[1, 13:] == 0).all() and (got[0] < 0).all()


def test_hf_refusals_name_what_is_not_supported():
    from transformers import GPT2Config, LlamaConfig, MistralConfig

    with pytest.raises(ValueError, match="tanh GELU only"):
        B.config_from_hf(GPT2Config(n_layer=1, n_head=2, n_embd=32, activation_function="gelu"))
    with pytest.raises(ValueError, match="RoPE scaling 'linear'"):
        B.config_from_hf(LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                     rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    with pytest.raises(ValueError, match="model type 'mistral'"):
        B.config_from_hf(MistralConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64))


def test_heads_narrower_than_the_width_load_from_transformers_with_equal_logits():
    """A Llama whose heads * head_dim is not its width (what structured pruning leaves) loads, with transformers' logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=6, intermediate_size=40, max_position_embeddings=32)).eval()
    ours = B.from_hf(hf).eval()
    assert (ours.config.head_dim, ours.config.attn_dim, ours.blocks[0].attn.o_proj.in_features) == (6, 24, 24)
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-5, rtol=0)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) == ours.config.shape().n_params


def test_adapters_from_peft_work_with_gradient_checkpointing():
    """Wrapping q_proj and v_proj (peft's LoRA, as a user would) must not break recomputing the blocks in the backward pass."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = M.GPT(M.GPTConfig.llama(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert type(base.blocks[0].attn.q_proj).__name__ == "Linear" and hasattr(base.blocks[0].attn.q_proj, "lora_A")
    x = torch.randint(0, 64, (2, 12))

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        base.gradient_checkpointing = checkpointing
        base.zero_grad()
        base(x, x)[1].backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain, recomputed = grads(False), grads(True)
    assert len(plain) == 8 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, recomputed))


def test_gpt2_matches_a_model_transformers_built_itself_where_gelu_variants_differ():
    """The reference is GPT2LMHeadModel from its own config and init (not our to_hf), with weights large enough that the
    MLP's pre-activations reach the range where the exact and tanh GELUs part (|x| of a few units)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4, activation_function="gelu_new",
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    with torch.no_grad():
        for block in hf.transformer.h:
            block.mlp.c_fc.weight.normal_(0, 0.5)
    ours = B.from_hf(hf)
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        theirs = hf(x).logits
        torch.testing.assert_close(ours(x)[0], theirs, atol=1e-4, rtol=1e-5)
        exact = torch.nn.functional.gelu(torch.linspace(-4, 4, 9)) - torch.nn.functional.gelu(torch.linspace(-4, 4, 9), approximate="tanh")
        assert exact.abs().max() > 1e-4, "at this scale the two GELUs differ by more than the tolerance"


def test_the_training_forward_traces_as_one_graph_with_the_same_loss(pair):
    """Under torch.compile the loss over targets with -100 (a prompt's) is one graph, no data-dependent branch: a graph
    break there waits for the device every step. Same loss as eager, which runs the head on learned positions only."""
    ours, _ = pair
    idx = torch.randint(0, ours.config.vocab_size, (2, 12))
    targets = torch.randint(0, ours.config.vocab_size, (2, 12))
    targets[:, :5] = -100
    explained = torch._dynamo.explain(ours)(idx, targets)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(idx, targets)[1], ours(idx, targets)[1], atol=1e-5, rtol=1e-5)
