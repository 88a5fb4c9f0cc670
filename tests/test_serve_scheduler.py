"""Continuous batching gives each request exactly what it would get alone (llmnb.generate, batch 1, its own KV cache)."""
import threading

import torch

from llmnb.generate import generate
from llmnb.model import GPT, GPTConfig
from llmnb.serve.scheduler import QueueFull, Sampling, Scheduler, Sequence, cache_bytes

import pytest


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig.llama(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()


def alone(model, prompt, n, **options):
    out = generate(model, torch.tensor([prompt]), n, **options)
    return out[0, len(prompt):].tolist()


def submit(scheduler, prompt, sampling):
    seq = Sequence(prompt, sampling, emit=lambda token: seq.events.append(token))
    seq.events = []
    scheduler.submit(seq)
    return seq


def run_until_idle(scheduler):
    while scheduler.running or scheduler.waiting:
        scheduler.step()


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_requests_joining_and_leaving_get_what_they_would_alone(model, max_batch):
    s = Scheduler(model, max_batch=max_batch, context=64)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [9, 8, 7, 6, 5]]
    lengths = [12, 5, 1, 7]  # rows finish at different steps (one at its first token): the last row moves into a freed one
    seqs = [submit(s, prompts[0], Sampling(lengths[0], temperature=0))]
    for _ in range(3):  # the first request runs alone for a while; the others join mid-flight
        s.step()
    seqs += [submit(s, p, Sampling(n, temperature=0)) for p, n in zip(prompts[1:], lengths[1:])]
    run_until_idle(s)
    for prompt, n, seq in zip(prompts, lengths, seqs):
        tokens, logprobs = generate(model, torch.tensor([prompt]), n, temperature=0, return_logprobs=True)
        assert seq.tokens == tokens[0, len(prompt):].tolist()
        assert seq.events[-1].finish == "length" and len(seq.events) == n
        # the same numbers, not only the same choices: a row that saw another row's positions would differ here
        assert torch.allclose(torch.tensor([t.logprob for t in seq.events]), logprobs[0], atol=1e-5)


def test_logprobs_and_seeded_sampling_match_generate(model):
    s = Scheduler(model, max_batch=4, context=64)
    greedy = submit(s, [3, 1, 4, 1, 5], Sampling(6, temperature=0, top_logprobs=3))
    sampled = submit(s, [2, 7, 1, 8], Sampling(6, temperature=0.9, top_p=0.95, seed=11))
    run_until_idle(s)
    expected, logprobs = generate(model, torch.tensor([[3, 1, 4, 1, 5]]), 6, temperature=0, return_logprobs=True)
    assert torch.allclose(torch.tensor([t.logprob for t in greedy.events]), logprobs[0], atol=1e-5)
    assert all(t.top[0][0] == t.id and len(t.top) == 3 for t in greedy.events)  # greedy: the best alternative is the choice
    assert sampled.tokens == alone(model, [2, 7, 1, 8], 6, temperature=0.9, top_p=0.95, seed=11)


def test_stop_tokens_cancellation_and_limits(model):
    first = alone(model, [10, 11, 12], 3, temperature=0)
    s = Scheduler(model, max_batch=2, context=16, max_waiting=2)
    stopped = submit(s, [10, 11, 12], Sampling(10, temperature=0, stop_ids=frozenset({first[2]})))
    cancelled = submit(s, [1, 2], Sampling(10, temperature=0))
    s.step()
    s.cancel(cancelled)
    run_until_idle(s)
    assert stopped.tokens == first and stopped.events[-1].finish == "stop"
    assert cancelled.events[-1].finish == "cancelled" and len(cancelled.tokens) == 2  # freed at the next step
    assert s.running == [] and int(s.cache.lengths.sum()) >= 0
    with pytest.raises(ValueError, match="exceeds the context of 16 by 2"):
        submit(s, list(range(10)), Sampling(8))
    submit(s, [1], Sampling(2))
    submit(s, [1], Sampling(2))
    with pytest.raises(QueueFull):
        submit(s, [1], Sampling(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_batch,compile", [(1, False), (1, True), (8, False), (8, True)])
def test_cache_bytes_are_what_a_scheduler_allocates(model, dtype, max_batch, compile):
    """The figure reports put beside a server's memory is the cache its scheduler holds (a compiled step's padding row too)."""
    import copy

    prepared = copy.deepcopy(model).to(dtype)
    held = Scheduler(prepared, max_batch, context=40, compile=compile).cache.nbytes()  # not started: nothing is built
    assert cache_bytes(model, max_batch, 40, dtype, compile=compile) == held


def test_background_thread_serves_and_stops(model):
    s = Scheduler(model, max_batch=4, context=64).start()
    seqs = [submit(s, [i + 1, i + 2], Sampling(5, temperature=0)) for i in range(6)]
    s.stop()  # finishes what was submitted first
    assert [seq.tokens for seq in seqs] == [alone(model, [i + 1, i + 2], 5, temperature=0) for i in range(6)]


def test_an_idle_scheduler_hands_its_free_heap_pages_back(model, monkeypatch):
    """After its last request the model thread trims the heap (malloc_trim) before it waits: the server's resident
    memory then reads what it holds, not its busiest moment."""
    from llmnb import hardware

    events, trimmed = [], threading.Event()
    monkeypatch.setattr(hardware, "trim_heap", lambda: (events.append("trim"), trimmed.set()))
    s = Scheduler(model, max_batch=2, context=64).start()
    trimmed.wait(5)  # the first idle moment: before any request
    trimmed.clear()
    seq = Sequence([1, 2], Sampling(3, temperature=0), emit=lambda token: events.append(token.finish or "token"))
    s.submit(seq)
    assert trimmed.wait(10), "no trim after the request finished"
    s.stop()
    assert events.index("length") < len(events) - 1 - events[::-1].index("trim"), events


def test_a_served_adapter_is_merged_onto_its_base(tmp_path):
    """`llmnb serve BASE --adapter DIR`: the served model computes what the base with that adapter computes."""
    from llmnb import lora
    from llmnb.assets import TINY_CHAT, prepare_tiny_chat
    from llmnb.checkpoint import load
    from llmnb.serve.served import Served, ServeConfig

    base_dir = prepare_tiny_chat()
    tuned, _ = load(base_dir)
    lora.attach(tuned, ["q_proj", "v_proj"], r=4, alpha=8)
    for layer in lora.adapters(tuned).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)  # a trained adapter: B is not zero
    lora.save_adapter(tuned, tmp_path / "adapter", base_model=TINY_CHAT)
    served = Served(ServeConfig(str(base_dir), adapter=str(tmp_path / "adapter"), moderation="none", dtype="float32"))
    served.load()
    try:
        x = torch.randint(0, 1000, (2, 12))
        with torch.no_grad():
            assert torch.allclose(served.model(x)[0], tuned(x)[0], atol=1e-4)
            assert not torch.allclose(served.model(x)[0], load(base_dir)[0](x)[0], atol=1e-2)  # the adapter changed something
    finally:
        served.scheduler.stop()
