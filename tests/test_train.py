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
from llmnb.tokenizer import ENDOFTEXT, train_bpe


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small BPE token dataset laid out as notebook 01 writes it."""
    folder = tmp_path_factory.mktemp("tokens")
    docs = data.load_corpus("shakespeare").documents[:60]
    tok = train_bpe([d.text for d in docs], 320, special_tokens=[ENDOFTEXT])
    tok.to_hf_json(folder / "tokenizer.json")
    eot = tok.special_tokens[ENDOFTEXT]
    data.write_token_file(data.encode_documents(docs[:54], tok.encode, eot), folder / "train.bin", tok.vocab_size)
    data.write_token_file(data.encode_documents(docs[54:], tok.encode, eot), folder / "val.bin", tok.vocab_size)
    (folder / "meta.json").write_text(json.dumps({"vocab_size": tok.vocab_size, "tokenizer": "tokenizer.json", "end_of_text": eot}))
    return folder


def config(data_dir, out_dir, **overrides):
    values = dict(data_dir=str(data_dir), out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4,
                  max_steps=12, warmup_steps=3, eval_interval=6, eval_batches=2, checkpoint_interval=0, sample_tokens=8, seed=3)
    return train.TrainConfig(**{**values, **overrides})


def losses(out_dir):
    steps, _ = train.read_metrics(out_dir / "metrics.jsonl")
    return [s["loss"] for s in steps]


def test_training_lowers_the_loss_logs_metrics_and_saves_a_loadable_model(data_dir, tmp_path):
    result = train.train(config(data_dir, tmp_path, max_steps=30, lr=3e-3), progress=False)
    steps, evals = train.read_metrics(result.metrics_file)
    assert len(steps) == 30 and steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_mb"} <= set(steps[0])
    assert evals[-1]["step"] == 30 and evals[-1]["val_perplexity"] == pytest.approx(np.exp(evals[-1]["val_loss"]))
    assert evals[-1]["samples"][0].startswith("ROMEO:")
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(result.hf_dir))
    assert generator("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("ROMEO:")


def test_resumed_run_continues_the_same_loss_curve(data_dir, tmp_path):
    train.train(config(data_dir, tmp_path / "straight"), progress=False)
    train.train(config(data_dir, tmp_path / "resumed"), stop_after=5, progress=False)
    assert len(losses(tmp_path / "resumed")) == 5
    train.train(config(data_dir, tmp_path / "resumed"), progress=False)
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["model"]
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
    state = torch.load(out / "checkpoint.pt", weights_only=False)  # complete: atomic rename
    assert 0 < state["step"] < 400
    result = train.train(config(data_dir, out, max_steps=state["step"] + 3, checkpoint_interval=1, eval_interval=1000, save_hf=False), progress=False)
    assert result.steps == state["step"] + 3


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path, strategy):
    common = ["n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "max_steps=6", "eval_interval=6", "eval_batches=2", "save_hf=false", f"data_dir={json.dumps(str(data_dir))}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "llmnb.train", "--set", *common, "batch_size=8", f"out_dir={json.dumps(str(tmp_path / 'one'))}"],
                   check=True, env=env, capture_output=True)
    port = "29517" if strategy == "ddp" else "29518"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port, "-m", "llmnb.train", "--set", *common,
                          "batch_size=4", f"distributed={json.dumps(strategy)}", f"out_dir={json.dumps(str(tmp_path / 'two'))}"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    start = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2


def test_schedule_and_weight_decay_groups(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert [round(train.learning_rate(s, cfg), 3) for s in (0, 3)] == [0.25, 1.0]
    assert train.learning_rate(9, cfg) == pytest.approx(0.55)
    assert train.learning_rate(14, cfg) == pytest.approx(0.1)
    from llmnb.model import GPT

    model = GPT(train.model_config(cfg, 320))
    decay, no_decay = train.make_optimizer(model, cfg).param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and all(p is not model.wte.weight for p in decay["params"])
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_params()


def test_gradient_checkpointing_gives_the_same_losses(data_dir, tmp_path):
    train.train(config(data_dir, tmp_path / "plain", max_steps=4, save_hf=False), progress=False)
    train.train(config(data_dir, tmp_path / "recompute", max_steps=4, save_hf=False, gradient_checkpointing=True), progress=False)
    assert losses(tmp_path / "recompute") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)


def test_a_model_too_big_for_this_machine_is_refused_by_default(data_dir, tmp_path):
    with pytest.raises(ValueError, match="exceeds the budget"):
        train.train(config(data_dir, tmp_path, n_layer=48, n_embd=8192, n_head=64, batch_size=64), progress=False)


@pytest.mark.parametrize("overrides, message", [
    ({"n_embd": 30, "n_head": 4}, "divisible by n_head"),
    ({"block_size": 100_000}, "lower block_size"),
    ({"memory_budget_gb": 1e-4}, "exceeds the budget"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"precision": "fp8"}, "precision must be"),
])
def test_impossible_configurations_are_refused_before_training(data_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.train(config(data_dir, tmp_path, **overrides), progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_missing_data_and_unknown_settings_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebook 01"):
        train.train(train.TrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "o")), progress=False)
    with pytest.raises(ValueError, match="unknown training settings"):
        train.TrainConfig.from_dict({"learning_rate": 1})
