import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from llmnb import data, train
from llmnb.checkpoint import read_checkpoint
from llmnb.model import GPT, GPTConfig
from llmnb.tokenizer import ENDOFTEXT, train_bpe


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small BPE token dataset, written as notebook 01 writes it."""
    folder = tmp_path_factory.mktemp("tokens")
    docs = data.load_corpus("shakespeare").documents[:60]
    tok = train_bpe([d.text for d in docs], 320, special_tokens=[ENDOFTEXT])
    eot = tok.special_tokens[ENDOFTEXT]
    streams = {"train": data.encode_documents(docs[:54], tok.encode, eot), "val": data.encode_documents(docs[54:], tok.encode, eot)}
    data.write_token_dataset(folder, tok, streams, corpus="shakespeare-60")
    return folder


def config(data_dir, out_dir, **overrides):
    values = dict(data_dir=str(data_dir), out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4,
                  max_steps=12, warmup_steps=3, eval_interval=6, eval_batches=2, checkpoint_interval=0, sample_tokens=8, seed=3, log_interval=1)
    return train.PretrainConfig(**{**values, **overrides})


def metrics(out_dir, field="loss"):
    steps, _ = train.read_metrics(out_dir / "metrics.jsonl")
    return [s[field] for s in steps]


def unigram_score(text_ids: list[int], counts: np.ndarray) -> float:
    """Mean log unigram frequency of the tokens: high for text made of common tokens, low for uniform noise."""
    p = (counts + 1) / (counts.sum() + len(counts))
    return float(np.log(p[text_ids]).mean())


def test_training_lowers_the_loss_logs_metrics_and_saves_a_loadable_model(data_dir, tmp_path):
    result = train.pretrain(config(data_dir, tmp_path, max_steps=40, lr=3e-3, sample_tokens=24, eval_interval=40), progress=False)
    steps, evals = train.read_metrics(result.metrics_file)
    assert len(steps) == 40 and steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_mb"} <= set(steps[0])
    assert evals[-1]["step"] == 40 and evals[-1]["val_perplexity"] == pytest.approx(np.exp(evals[-1]["val_loss"]))
    # the samples must look like the corpus, which an untrained model's do not: compare both by unigram frequency
    tokenizer = train.data_tokenizer(data_dir)
    counts = np.bincount(data.read_tokens(data_dir, "train"), minlength=tokenizer.vocab_size + 1)
    prompt = len(tokenizer.encode("ROMEO:\n"))
    trained = unigram_score(tokenizer.encode(evals[-1]["samples"][0])[prompt:], counts)
    torch.manual_seed(0)
    untrained = GPT(train.model_config(config(data_dir, tmp_path), 320))
    fresh = unigram_score(tokenizer.encode(train.sample_texts(untrained, tokenizer, config(data_dir, tmp_path, sample_tokens=24))[0])[prompt:], counts)
    assert trained > fresh + 1.0, f"trained samples ({trained:.2f}) should use far more common tokens than an untrained model's ({fresh:.2f})"
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(result.hf_dir))
    assert len(generator.tokenizer) == 320
    assert generator("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("ROMEO:")


def test_a_finished_run_says_so_instead_of_training_again(data_dir, tmp_path, capsys):
    first = train.pretrain(config(data_dir, tmp_path, max_steps=4, save_hf=False), progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text()
    again = train.pretrain(config(data_dir, tmp_path, max_steps=4, save_hf=False), progress=False)
    assert again.already_finished and again.steps == 4 and again.final_val_loss == first.final_val_loss
    assert "already finished at step 4" in capsys.readouterr().out
    assert (tmp_path / "metrics.jsonl").read_text() == lines


def test_resumed_run_continues_the_same_loss_curve_with_dropout_on(data_dir, tmp_path):
    """Dropout draws from the RNG: a resume that did not restore the RNG state would leave the curve."""
    train.pretrain(config(data_dir, tmp_path / "straight", dropout=0.2), progress=False)
    train.pretrain(config(data_dir, tmp_path / "resumed", dropout=0.2), stop_after=5, progress=False)
    assert len(metrics(tmp_path / "resumed")) == 5
    train.pretrain(config(data_dir, tmp_path / "resumed", dropout=0.2), progress=False)
    assert metrics(tmp_path / "resumed") == pytest.approx(metrics(tmp_path / "straight"), abs=1e-6)
    a, b = read_checkpoint(tmp_path / "straight")["model"], read_checkpoint(tmp_path / "resumed")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_killed_run_leaves_a_complete_checkpoint_and_resumes(data_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "llmnb.train", "--set", f"data_dir={json.dumps(str(data_dir))}", f"out_dir={json.dumps(str(out))}",
           "n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "max_steps=400", "checkpoint_interval=1", "eval_interval=1000", "save_hf=false"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = read_checkpoint(out)  # complete: atomic rename
    assert 0 < state["step"] < 400
    result = train.pretrain(config(data_dir, out, max_steps=state["step"] + 3, checkpoint_interval=1, eval_interval=1000, save_hf=False), progress=False)
    assert result.steps == state["step"] + 3


def distributed_settings(data_dir, out) -> list[str]:
    """The settings every one-process vs several-process comparison shares. float64: one process and two sum the same
    numbers in another order; float32 would leave ~1e-6 between them."""
    return ["n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "eval_interval=100", "eval_batches=2", "save_hf=false", "log_interval=1",
            "lr=0.003", "warmup_steps=1", "sample_tokens=0", 'precision="fp64"', f"data_dir={json.dumps(str(data_dir))}",
            f"out_dir={json.dumps(str(out))}"]


def torchrun(data_dir, out, *settings, stop_after=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = distributed_settings(data_dir, out)
    if "nproc=1" in settings:
        cmd = [sys.executable, "-m", "llmnb.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llmnb.train"]  # a free port
    stop = ["--stop-after", str(stop_after)] if stop_after else []
    run = subprocess.run([*cmd, *stop, "--set", *common, *[s for s in settings if s != "nproc=1"]], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.long
@pytest.mark.parametrize("strategy, accum", [("ddp", 1), ("fsdp", 2)])
def test_two_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path, strategy, accum):
    """Losses and gradient norms at a real learning rate: a sum instead of a mean over ranks doubles every norm.
    Gradient accumulation is checked under FSDP (its micro-batches and its sharded optimizer state at once)."""
    # micro-batch m of a step holds the same windows whether one process draws them all or two split them
    torchrun(data_dir, tmp_path / "one", "nproc=1", f"batch_size={8 // accum}", f"grad_accum={accum}", "max_steps=6")
    two = [f"batch_size={4 // accum}", f"grad_accum={accum}", f"distributed={json.dumps(strategy)}", "max_steps=6"]
    if strategy == "fsdp":  # stopped after 3 steps and resumed: with fresh AdamW moments the steps after the cut would differ
        torchrun(data_dir, tmp_path / "two", *two, stop_after=3)
        assert read_checkpoint(tmp_path / "two")["optimizer"]["state"], "the FSDP checkpoint carries the AdamW moments"
    torchrun(data_dir, tmp_path / "two", *two)
    assert metrics(tmp_path / "two") == pytest.approx(metrics(tmp_path / "one"), abs=1e-10)
    assert metrics(tmp_path / "two", "grad_norm") == pytest.approx(metrics(tmp_path / "one", "grad_norm"), rel=1e-10)
    start = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["precision"] == "torch.float64"


@pytest.mark.long
def test_two_nodes_of_one_process_each_match_one_process(data_dir, tmp_path):
    """Two "machines" on this one: two torchrun launchers, one process each, meeting through the c10d rendezvous at an
    address (here 127.0.0.1; on a cluster, the first node's), as README's multi-node command runs them."""
    import socket

    torchrun(data_dir, tmp_path / "one", "nproc=1", "batch_size=8", "max_steps=4")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = [*distributed_settings(data_dir, tmp_path / "nodes"), "batch_size=4", "max_steps=4", 'distributed="ddp"']
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "llmnb-test",
                               "-m", "llmnb.train", "--set", *common],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(err[-2000:] for _, err in outputs)
    start = json.loads((tmp_path / "nodes" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
    assert metrics(tmp_path / "nodes") == pytest.approx(metrics(tmp_path / "one"), abs=1e-10)
    assert metrics(tmp_path / "nodes", "grad_norm") == pytest.approx(metrics(tmp_path / "one", "grad_norm"), rel=1e-10)


def test_starting_from_pretrained_weights_continues_where_they_left_off(data_dir, tmp_path):
    first = train.pretrain(config(data_dir, tmp_path / "a", max_steps=30, lr=3e-3), progress=False)
    scratch = metrics(tmp_path / "a")[0]
    train.pretrain(config(data_dir, tmp_path / "b", max_steps=2, init_from=str(first.hf_dir), save_hf=False), progress=False)
    assert metrics(tmp_path / "b")[0] < scratch - 0.5, "the first step of a run from pretrained weights starts at their loss"
    with pytest.raises(ValueError, match="tokenize the data with that model's tokenizer"):
        train.build_model(config(data_dir, tmp_path, init_from=str(first.hf_dir)), 10_000)


def test_only_parameters_that_require_grad_train_and_pairs_mask_the_prompt(data_dir, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.llama(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16))
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(("wte", "blocks.0"))  # the embedding and the first block frozen
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("wte", "blocks.0"))}
    pairs = [([1, 2, 3, 4], [10 + i % 5, 20 + i % 7, 2]) for i in range(40)]
    batches = {"train": data.PairBatches(pairs, 16, seed=0, pad_id=0), "val": data.PairBatches(pairs[:8], 16, seed=1, pad_id=0)}
    result = train.train(model, batches, config(data_dir, tmp_path, max_steps=40, lr=1e-2, eval_interval=40), progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    optimizer = read_checkpoint(tmp_path)["optimizer"]
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == sum(p.requires_grad for p in model.parameters())
    losses = metrics(tmp_path)
    assert losses[-1] < losses[0] - 0.5 and result.final_val_loss < losses[0]
    # the loss is over response tokens only: a prompt the model cannot predict costs nothing
    x, y = batches["train"].batch(0, 0, 4, "cpu")
    with torch.no_grad():
        logits, loss = model(x)[0], model(x, y)[1]
        learned = y != -100
        direct = torch.nn.functional.cross_entropy(logits[learned], y[learned])
    torch.testing.assert_close(loss, direct)
    with pytest.raises(ValueError, match="no parameter of the model requires a gradient"):
        train.make_optimizer(GPT(GPTConfig.llama(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16)).requires_grad_(False),
                             config(data_dir, tmp_path))


def test_values_are_read_back_from_the_device_only_at_the_logging_interval(data_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    item = torch.Tensor.item

    def counting(self):
        calls["n"] += 1
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting)
    counts = {}
    for interval in (1, 10):
        calls["n"] = 0
        train.pretrain(config(data_dir, tmp_path / str(interval), max_steps=10, eval_interval=100, log_interval=interval, save_hf=False), progress=False)
        counts[interval] = calls["n"]
    assert counts[10] <= counts[1] - 8, counts
    assert metrics(tmp_path / "10") == pytest.approx(metrics(tmp_path / "1"), abs=1e-6), "every step is still logged"


def test_schedule_and_weight_decay_groups(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert [round(train.learning_rate(s, cfg), 3) for s in (0, 3)] == [0.25, 1.0]
    assert train.learning_rate(9, cfg) == pytest.approx(0.55)
    assert train.learning_rate(14, cfg) == pytest.approx(0.1)
    model = GPT(train.model_config(cfg, 320))
    decay, no_decay = train.make_optimizer(model, cfg).param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and all(p is not model.wte.weight for p in decay["params"])
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_params()


def test_gradient_checkpointing_gives_the_same_losses(data_dir, tmp_path):
    train.pretrain(config(data_dir, tmp_path / "plain", max_steps=4, save_hf=False), progress=False)
    train.pretrain(config(data_dir, tmp_path / "recompute", max_steps=4, save_hf=False, gradient_checkpointing=True), progress=False)
    assert metrics(tmp_path / "recompute") == pytest.approx(metrics(tmp_path / "plain"), abs=1e-6)


def test_a_model_too_big_for_this_machine_is_refused_by_default(data_dir, tmp_path):
    with pytest.raises(ValueError, match="exceeds the budget"):
        train.check_memory(GPT(GPTConfig.gpt2(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32)),
                           config(data_dir, tmp_path, memory_budget_gb=1e-4), torch.device("cpu"))
    with torch.device("meta"):  # sizes only: 48 layers of width 8192 are never allocated
        big = GPT(GPTConfig.gpt2(vocab_size=320, block_size=64, n_layer=48, n_embd=8192, n_head=64))
    with pytest.raises(ValueError, match="exceeds the budget"):
        train.check_memory(big, config(data_dir, tmp_path, batch_size=64), torch.device("cpu"))


@pytest.mark.parametrize("overrides, message", [
    ({"n_embd": 30, "n_head": 4}, "divisible by n_head"),
    ({"block_size": 100_000}, "lower block_size"),
    ({"memory_budget_gb": 1e-4}, "exceeds the budget"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"precision": "fp8"}, "precision must be"),
    ({"min_lr": 1.0}, "min_lr <= lr"),
])
def test_impossible_configurations_are_refused_before_training(data_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.pretrain(config(data_dir, tmp_path, **overrides), progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_missing_data_unknown_settings_and_bad_config_files_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"artifacts.ensure\('tokens'\)"):
        train.pretrain(train.PretrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "o")), progress=False)
    with pytest.raises(ValueError, match="unknown training settings"):
        train.TrainConfig.from_dict({"learning_rate": 1})
    bad = tmp_path / "run.json"
    bad.write_text("{not json")
    for argv, message in ([["--config", str(bad)], "is not valid JSON"], [["--config", str(tmp_path / "none.json")], "no such file"]):
        run = subprocess.run([sys.executable, "-m", "llmnb.train", *argv], capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr


def test_a_config_file_trains_a_llama_model(data_dir, tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"data_dir": str(data_dir), "out_dir": str(tmp_path / "llama"), "flavour": "llama", "n_layer": 1, "n_head": 2,
                               "n_kv_head": 1, "n_embd": 32, "block_size": 32, "batch_size": 4, "max_steps": 3, "eval_interval": 3, "eval_batches": 1}))
    run = subprocess.run([sys.executable, "-m", "llmnb.train", "--config", str(cfg)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["steps"] == 3
    state = read_checkpoint(tmp_path / "llama")
    assert state["model_config"]["flavour"] == "llama" and state["model_config"]["n_kv_head"] == 1


@pytest.mark.cpu_paths
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_train_close_to_fp32(data_dir, tmp_path, precision):
    """CPU autocast runs the same code path as a GPU's (fp16 with the gradient scaler); the device run checks the speed."""
    train.pretrain(config(data_dir, tmp_path / "fp32", max_steps=6, lr=3e-3, save_hf=False), progress=False)
    train.pretrain(config(data_dir, tmp_path / precision, max_steps=6, lr=3e-3, save_hf=False, precision=precision), progress=False)
    start = json.loads((tmp_path / precision / "metrics.jsonl").read_text().splitlines()[0])
    assert start["precision"] == f"torch.{'bfloat16' if precision == 'bf16' else 'float16'}"
    ours, reference = metrics(tmp_path / precision), metrics(tmp_path / "fp32")
    assert ours == pytest.approx(reference, abs=0.05) and ours[-1] < ours[0]


def test_a_lora_run_checkpoints_only_its_adapters_and_resumes_on_the_same_curve(data_dir, tmp_path):
    from llmnb import lora

    def adapted():
        torch.manual_seed(0)
        model = GPT(GPTConfig.llama(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32))
        lora.attach(model, "all-linear", r=4, alpha=8)
        return model

    pairs = [([1, 2, 3, 4, 5], [10 + i % 5] * (1 + i % 4) + [2]) for i in range(40)]
    batches = {"train": data.PairBatches(pairs, 32, seed=0)}
    settings = dict(max_steps=8, lr=1e-2, eval_interval=100, checkpoint_interval=4, log_interval=1)
    train.train(adapted(), batches, config(data_dir, tmp_path / "straight", **settings), progress=False)
    state = read_checkpoint(tmp_path / "straight")
    assert state["trainable_only"] and set(state["model"]) == {n for n, p in adapted().named_parameters() if p.requires_grad}
    train.train(adapted(), batches, config(data_dir, tmp_path / "resumed", **settings), stop_after=4, progress=False)
    train.train(adapted(), batches, config(data_dir, tmp_path / "resumed", **settings), progress=False)
    assert metrics(tmp_path / "resumed") == pytest.approx(metrics(tmp_path / "straight"), abs=1e-6)
    other = GPT(GPTConfig.llama(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32))
    lora.attach(other, ["q_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="not the ones that train now"):
        train.train(other, batches, config(data_dir, tmp_path / "resumed", **{**settings, "max_steps": 12}), progress=False)


def test_a_compiled_run_follows_the_eager_one_and_saves_the_plain_model(data_dir, tmp_path, monkeypatch):
    """`compile=True` (the gpu preset's notebook 03): the loop trains the compiled module, every step's loss as eager's
    within float32 reordering, and its checkpoint and Hugging Face folder hold the model's own names. The graph is
    captured whole (fullgraph), with symbolic sizes, and run by AOTAutograd without Inductor's code generation, which
    costs a test minutes."""
    compiled, calls = torch.compile, []
    # dynamic: sizes traced as symbols, as dynamo does once a process has compiled the model at another shape
    monkeypatch.setattr(train.torch, "compile",
                        lambda model: calls.append(model) or compiled(model, backend="aot_eager", fullgraph=True, dynamic=True))
    eager = train.pretrain(config(data_dir, tmp_path / "eager"), progress=False)
    assert not calls
    result = train.pretrain(config(data_dir, tmp_path / "compiled", compile=True), progress=False)
    assert len(calls) == 1
    np.testing.assert_allclose(metrics(tmp_path / "compiled"), metrics(tmp_path / "eager"), rtol=1e-4)
    assert result.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-4)
    state = read_checkpoint(result.out_dir)
    assert not [k for k in state["model"] if "_orig_mod" in k] and state["step"] == 12
    assert (result.hf_dir / "model.safetensors").exists()
