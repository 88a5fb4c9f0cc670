"""Beyond data parallelism, on 2 processes of one CPU: what DeepSpeed's ZeRO and Megatron-LM's tensor parallelism do.

    torchrun --standalone --nproc-per-node 2 -m llmnb.parallel zero --strategy ddp --n-layer 4 --n-embd 512
    torchrun --standalone --nproc-per-node 2 -m llmnb.parallel tensor --n-embd 256

`zero`: AdamW steps of the same model and batch under three strategies, what each process holds measured (the bytes of
its weights between forward and backward, gradients and AdamW moments, DTensor shards counted as held) and its resident
peak (which adds the optimizer's temporaries and the collectives' buffers). "ddp" keeps
everything on every process (ZeRO stage 0); "shard-grad-op" is FSDP's SHARD_GRAD_OP (gradients and optimizer state
sharded, the weights gathered for the whole step: ZeRO-2); "full-shard" is FSDP's FULL_SHARD (weights sharded too,
gathered one block at a time: ZeRO-3). Megatron-LM's tensor parallelism (Shoeybi et al. 2019,
https://arxiv.org/abs/1909.08053) splits each block's matrices instead: `tensor` runs one MLP through PyTorch's own
`parallelize_module` and one attention layer split by heads by hand, and compares both with one process.
Every rank prints one JSON line; the notebook reads rank 0's.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .hardware import rank, release_freed_memory, reset_peak_resident, resident_bytes, world_size
from .model import GPT, GPTConfig, CausalSelfAttention, apply_rope, rope_tables

STRATEGIES = ("ddp", "shard-grad-op", "full-shard")


def _model(n_layer: int, n_embd: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.llama(vocab_size=512, block_size=64, n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd))


def _wrap(model: GPT, strategy: str) -> torch.nn.Module:
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)  # gradients live in the buckets: no second copy
    from torch.distributed.fsdp import fully_shard

    keep_gathered = strategy == "shard-grad-op"  # ZeRO-2: weights stay gathered from forward through backward
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=not keep_gathered)
    return fully_shard(model, reshard_after_forward=not keep_gathered)


def _local_bytes(tensors) -> int:
    """Bytes this process holds of `tensors` (a DTensor's local shard only)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors if t is not None)


def zero_memory(strategy: str, n_layer: int, n_embd: int, steps: int = 2) -> dict:
    """One process's memory over `steps` AdamW steps of the same model and batch under `strategy` (call under torchrun)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    ids = torch.randint(0, 512, (2 * world_size(), 65), generator=torch.Generator().manual_seed(1))[rank() * 2:(rank() + 1) * 2]
    if n_layer > 1 or n_embd > 64:  # the first steps page in code and thread pools (hundreds of MB): not the model's to pay
        zero_memory(strategy, 1, 64, steps=1)
    before = release_freed_memory()  # resident bytes with no model: what the steps' peak is measured from
    model = _model(n_layer, n_embd)
    params = sum(p.numel() for p in model.parameters())
    trained = _wrap(model, strategy)  # FSDP frees the unsharded weights here: the steps start from each strategy's own state
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    release_freed_memory()
    reset_peak_resident()
    losses = []
    for _ in range(steps):
        _, loss = trained(ids[:, :-1], ids[:, 1:])
        weights_in_step = _local_bytes(model.parameters())  # between forward and backward: gathered or sharded
        loss.backward()
        held_grads = _local_bytes(p.grad for p in trained.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        average = loss.detach().clone()
        dist.all_reduce(average, op=dist.ReduceOp.AVG)
        losses.append(float(average))
    moments = _local_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"strategy": strategy, "world_size": world_size(), "parameters": params, "losses": losses,
            "weights_held_mb": _local_bytes(trained.parameters()) / 1e6, "weights_in_step_mb": weights_in_step / 1e6,
            "gradients_held_mb": held_grads / 1e6, "optimizer_held_mb": moments / 1e6,
            "state_at_peak_mb": (weights_in_step + held_grads + moments) / 1e6,  # the model state held through backward
            "peak_rise_mb": (resident_bytes()[1] - before) / 1e6}


# --- tensor parallelism ---------------------------------------------------------------------


def attention_shard(attn: CausalSelfAttention, x: torch.Tensor, rope, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's share of one attention layer, Megatron's way: its heads' rows of q, k, v (column-parallel) and the
    matching columns of o (row-parallel). Summing the shares of every rank (one all-reduce) gives the layer's output."""
    c = attn.config
    heads, kv_heads = c.n_head // tp_size, c.n_kv_head // tp_size
    q_rows = slice(tp_rank * heads * c.head_dim, (tp_rank + 1) * heads * c.head_dim)
    kv_rows = slice(tp_rank * kv_heads * c.head_dim, (tp_rank + 1) * kv_heads * c.head_dim)
    b, t, _ = x.shape
    q = F.linear(x, attn.q_proj.weight[q_rows]).view(b, t, heads, c.head_dim).transpose(1, 2)  # (B, nh/tp, T, hs)
    k = F.linear(x, attn.k_proj.weight[kv_rows]).view(b, t, kv_heads, c.head_dim).transpose(1, 2)  # (B, nkv/tp, T, hs)
    v = F.linear(x, attn.v_proj.weight[kv_rows]).view(b, t, kv_heads, c.head_dim).transpose(1, 2)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, heads * c.head_dim)
    return F.linear(y, attn.o_proj.weight[:, q_rows])  # (B, T, C): a partial sum


def tensor_parallel(n_embd: int, tokens: int = 16) -> dict:
    """One Llama MLP (PyTorch's parallelize_module) and one attention layer (by hand) split over the processes,
    against the same layers on one process; the values each all-reduce carries, counted (call under torchrun)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    block = _model(1, n_embd).blocks[0]  # the same weights on every rank (same seed)
    x = torch.randn(2, tokens, n_embd, generator=torch.Generator().manual_seed(2))
    cos, sin = rope_tables(block.attn.config.head_dim, tokens, block.attn.config.rope_theta)
    rope = (cos.unsqueeze(0).unsqueeze(0), sin.unsqueeze(0).unsqueeze(0))  # broadcast over (B, heads)
    with torch.no_grad():
        expected_mlp = block.mlp(x)
        expected_attn = block.attn(x, rope, None, None, 0)
        partial = attention_shard(block.attn, x, rope, rank(), world_size())
        by_hand = partial.clone()
        dist.all_reduce(by_hand)
        mesh = init_device_mesh("cpu", (world_size(),))
        mlp = parallelize_module(block.mlp, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()})
        with CommDebugMode() as comm:
            got_mlp = mlp(x)
    return {"world_size": world_size(), "n_embd": n_embd, "mlp_max_difference": float((got_mlp - expected_mlp).abs().max()),
            "attention_max_difference": float((by_hand - expected_attn).abs().max()),
            "attention_partial_max_difference": float((partial - expected_attn).abs().max()),
            "mlp_collectives": {str(k): v for k, v in comm.get_comm_counts().items()},
            "values_all_reduced_per_layer": x.numel(), "weights_per_rank": 1 / world_size()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmnb.parallel", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("zero", "tensor"))
    parser.add_argument("--strategy", default="ddp", choices=STRATEGIES)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run it under torchrun: torchrun --standalone --nproc-per-node 2 -m llmnb.parallel ...")
    heads = args.n_embd // 64
    if args.n_embd % 64 or heads == 0 or (args.what == "tensor" and heads % world_size()):
        parser.error(f"--n-embd must be a multiple of 64 (heads of 64) and, for tensor, its heads must divide over {world_size()} processes")
    dist.init_process_group("gloo")
    try:
        torch.set_num_threads(1)
        result = zero_memory(args.strategy, args.n_layer, args.n_embd) if args.what == "zero" else tensor_parallel(args.n_embd)
        for turn in range(world_size()):  # one rank at a time: lines written together would interleave
            if turn == rank():
                print(json.dumps({"rank": rank(), **result}), flush=True)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
