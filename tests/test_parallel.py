"""ZeRO-style sharding and tensor parallelism on 2 processes of this CPU (llmnb.parallel under torchrun)."""
import json
import os
import subprocess
import sys

import pytest


def torchrun(*args: str) -> dict:
    """Rank 0's JSON line from `python -m llmnb.parallel ARGS` on 2 processes."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llmnb.parallel", *args],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert sorted(line["rank"] for line in lines) == [0, 1]
    return next(line for line in lines if line["rank"] == 0)


@pytest.mark.long
def test_tensor_parallel_mlp_and_attention_equal_one_process_after_one_all_reduce():
    out = torchrun("tensor", "--n-embd", "128")
    assert out["mlp_max_difference"] < 1e-5 and out["attention_max_difference"] < 1e-5
    assert out["attention_partial_max_difference"] > 1e-3, "one rank's share alone is not the layer's output"
    assert sum(out["mlp_collectives"].values()) == 1 and "all_reduce" in next(iter(out["mlp_collectives"])), out["mlp_collectives"]


@pytest.mark.long
def test_sharding_strategies_train_alike_and_hold_less_per_process_the_more_they_shard():
    """ZeRO's ordering, measured: full sharding < sharded gradients and optimizer < DDP, at the same losses."""
    runs = {s: torchrun("zero", "--strategy", s, "--n-layer", "4", "--n-embd", "256") for s in ("ddp", "shard-grad-op", "full-shard")}
    ddp, grad_op, full = runs["ddp"], runs["shard-grad-op"], runs["full-shard"]
    for other in (grad_op, full):
        assert other["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
        assert other["weights_held_mb"] == pytest.approx(ddp["weights_held_mb"] / 2, rel=0.05)  # each process keeps half between steps
        assert other["optimizer_held_mb"] == pytest.approx(ddp["optimizer_held_mb"] / 2, rel=0.05)
    assert grad_op["weights_in_step_mb"] == pytest.approx(ddp["weights_in_step_mb"]), "ZeRO-2 gathers every weight for the step"
    assert full["weights_in_step_mb"] == pytest.approx(full["weights_held_mb"]), "ZeRO-3 gathers one block at a time, then lets go"
    assert full["state_at_peak_mb"] < grad_op["state_at_peak_mb"] < ddp["state_at_peak_mb"], {s: r["state_at_peak_mb"] for s, r in runs.items()}


def test_the_command_says_how_to_run_it_and_refuses_widths_it_cannot_split():
    alone = subprocess.run([sys.executable, "-m", "llmnb.parallel", "zero"], capture_output=True, text=True)
    assert alone.returncode == 2 and "run it under torchrun" in alone.stderr
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2"}
    odd = subprocess.run([sys.executable, "-m", "llmnb.parallel", "tensor", "--n-embd", "192"], capture_output=True, text=True, env=env)
    assert odd.returncode == 2 and "must divide over 2 processes" in odd.stderr
