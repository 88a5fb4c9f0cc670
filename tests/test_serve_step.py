"""The server's compiled step (llmnb.serve.step): one library for any rows and cache, built in a child process, reading
the model's own weights; the same tokens as the eager step, and eager, with one warning, whenever it cannot be had."""
import copy
import json
import weakref

import pytest
import torch

from llmnb.model import GPT, GPTConfig
from llmnb.serve import step
from llmnb.serve.scheduler import Sampling, Scheduler
from llmnb.serve.step import DecodeStep, library_path, row_mask
from test_serve_scheduler import alone, model, run_until_idle, submit  # noqa: F401 - `model` is a fixture

ROWS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [9, 8, 7, 6, 5]]


def _joining_and_leaving(scheduler):
    """Requests of different lengths joining mid-flight and finishing at different steps: each row's tokens and log-probabilities."""
    seqs = []
    for prompt, n in zip(ROWS, [12, 5, 1, 7]):
        seqs.append(submit(scheduler, prompt, Sampling(n, temperature=0, top_logprobs=2)))
        scheduler.step()
    run_until_idle(scheduler)
    return [seq.tokens for seq in seqs], torch.tensor([e.logprob for seq in seqs for e in seq.events])


FORCED = {"reductions": 1.0, "many": 2.0, "packed": 3.0}  # what timing one row is taken to say, unless a test says otherwise


def _timed(ms: dict[str, float]):
    """What `StepGraph.time_ways` returns when one row takes `ms` each way."""
    return lambda: (min(ms, key=ms.get), ms)


def _built(model, max_batch=3, one_row_ms=FORCED) -> Scheduler:
    """A scheduler with its step built, nothing recorded or read; `one_row_ms`: what timing one row each way is taken
    to say (the default keeps the single-row library, which most tests here check; None: measure)."""
    s = Scheduler(model, max_batch=max_batch, context=64, compile=True)
    assert s.step_state() == "building"  # /health's "step": a client waits for "compiled" (ServerProcess.wait_step)
    s.graph.choice_path = None
    if one_row_ms:
        s.graph.time_ways = _timed({way: one_row_ms[way] for way in s.graph.ways})
    s.graph.build()
    assert s.graph.ready and s.step_state() == "compiled", s.decoding()
    return s


@pytest.mark.cpu_paths  # Inductor writes its C++ for the processor's vector ISA: run again on the lower path
@pytest.mark.parametrize("max_batch", [1, 3])
def test_a_compiled_step_serves_what_the_eager_one_does(model, max_batch):
    """One library for every number of rows and every cache, and one for a single row (its products as reductions):
    rows joining and leaving, caches of 2 and 3 slots; a call either refused would fall back and say so."""
    compiled = _built(model, max_batch)
    assert compiled.graph.single is not None, compiled.graph.single_failed
    tokens, logprobs = _joining_and_leaving(compiled)
    assert not compiled.graph.failed and not compiled.graph.single_failed, (compiled.graph.failed, compiled.graph.single_failed)
    eager_tokens, eager_logprobs = _joining_and_leaving(Scheduler(model, max_batch=max_batch, context=64))
    assert tokens == eager_tokens
    torch.testing.assert_close(logprobs, eager_logprobs, atol=1e-5, rtol=0)
    assert compiled.decoding().startswith("one compiled library per step")


class _Counted:
    """A library whose calls are counted: the rows of each."""

    def __init__(self, library):
        self.library, self.rows = library, []

    def boxed_run(self, inputs: list):
        self.rows.append(inputs[0].shape[0])
        return self.library.boxed_run(inputs)


def _plain_matrices(model) -> int:
    return sum(type(m) is torch.nn.Linear and m.weight is not model.wte.weight for m in model.modules())


@pytest.mark.parametrize("fastest", ["reductions", "many", "packed"])
def test_one_row_is_served_the_way_that_timed_fastest(model, fastest):
    """Which way serves one row fastest depends on the processor (reductions won clearly on a Zen 4 EPYC; packed weights
    on a Xeon with AMX): each serves what the eager step does, and /health says which and why. Packed, the model's own
    matrices are swapped for packed ones: no plain copy is left."""
    served = copy.deepcopy(model)
    plain = weakref.ref(served.blocks[0].mlp.down_proj.weight)
    s = _built(served, max_batch=1, one_row_ms={**FORCED, fastest: 0.5})
    assert (plain() is None) == (fastest == "packed")  # packed: the plain matrix is gone, not kept beside its packed form
    assert s.graph.way == fastest and (s.graph.single is not None) == (fastest == "reductions") and s.step_state() == "compiled"
    times = {"reductions": "reductions 0.5, many 2.0, packed 3.0", "many": "many 0.5, reductions 1.0, packed 3.0",
             "packed": "packed 0.5, reductions 1.0, many 2.0"}[fastest]
    assert f"{step.WAYS[fastest]} (ms a step: {times}; timed at this start)" in s.decoding(), s.decoding()
    assert _plain_matrices(served) == (0 if fastest == "packed" else _plain_matrices(model)) and _plain_matrices(model) > 0
    assert (library_path(DecodeStep(served)) == library_path(DecodeStep(model))) == (fastest != "packed")
    s.graph.runner = many = _Counted(s.graph.runner)
    tokens, logprobs = _joining_and_leaving(s)
    eager_tokens, eager_logprobs = _joining_and_leaving(Scheduler(model, max_batch=1, context=64))
    assert tokens == eager_tokens and not s.graph.failed and not s.graph.single_failed
    torch.testing.assert_close(logprobs, eager_logprobs, atol=1e-5, rtol=0)
    # the library of many was exported for 2 rows or more: one row reaches it padded to two, or not at all
    assert set(many.rows) == (set() if fastest == "reductions" else {2}), many.rows


def test_one_row_is_timed_each_way_in_a_child_and_recorded(model, tmp_path, monkeypatch):
    """The first start times one row each way in a child process (on zero weights: a library keeps the tensors it was
    loaded with alive, so the server loads only the way it keeps) and records the fastest; the next start reads it."""
    record = tmp_path / "choice.json"
    monkeypatch.setattr(step, "choice_path", lambda _: record)
    monkeypatch.setattr(step, "compile_library", lambda *_: pytest.fail("the child names its libraries as the server does: "
                                                                         "it built every one the way needs"))
    s = Scheduler(copy.deepcopy(model), max_batch=2, context=64, compile=True)
    s.graph.build()
    way, ms = s.graph.way, s.graph.one_row_ms
    assert set(ms) == set(s.graph.ways) == {"reductions", "many", "packed"} and all(0 < t < 1e3 for t in ms.values()), ms
    assert way == min(ms, key=ms.get) and json.loads(record.read_text()) == {"way": way, "ms": ms}
    assert "timed at this start" in s.decoding() and s.step_state() == "compiled" and not s.graph.recorded
    assert step.packs_weights(model) == (way == "packed")

    def never():
        raise AssertionError("timed again")

    again = Scheduler(copy.deepcopy(model), max_batch=2, context=64, compile=True)
    again.graph.time_ways = never
    again.graph.build()
    assert again.graph.way == way and again.graph.recorded and "timed on an earlier start" in again.decoding(), again.decoding()


def test_a_recorded_way_is_read_before_the_first_product(model, tmp_path, monkeypatch):
    """A restarted server packs its weights where "packed" was recorded, and sizes oneDNN's kernel cache for its layout
    (`packs_weights`) before its first product; an unreadable record is timed again."""
    record = tmp_path / "choice.json"
    monkeypatch.setattr(step, "choice_path", lambda _: record)
    assert step.packs_weights(model)  # nothing recorded: a first start may pack
    record.write_text(json.dumps({"way": "packed", "ms": {"packed": 1.0, "many": 2.0}}))
    assert step.packs_weights(model)
    served = copy.deepcopy(model)
    s = Scheduler(served, max_batch=2, context=64, compile=True)
    s.graph.build()
    assert s.graph.way == "packed" and s.graph.recorded and _plain_matrices(served) == 0
    assert "ms a step: packed 1.0, many 2.0; timed on an earlier start" in s.decoding(), s.decoding()
    tokens, logprobs = _joining_and_leaving(s)
    eager_tokens, eager_logprobs = _joining_and_leaving(Scheduler(model, max_batch=2, context=64))
    assert tokens == eager_tokens
    torch.testing.assert_close(logprobs, eager_logprobs, atol=1e-5, rtol=0)

    record.write_text(json.dumps({"way": "many", "ms": {"many": 1.0}}))
    assert not step.packs_weights(model)  # a plain layout: the cache keeps one product
    record.write_text("{not json")
    timed = Scheduler(copy.deepcopy(model), max_batch=2, context=64, compile=True)
    timed.graph.time_ways = _timed({"reductions": 2.0, "many": 1.0, "packed": 3.0})
    timed.graph.build()
    assert timed.graph.way == "many" and not timed.graph.recorded and "timed at this start" in timed.decoding()


def test_time_one_row_runs_each_library_on_one_row(model):
    s = _built(model, max_batch=2)
    libraries = {"reductions": _Counted(s.graph.single), "many": _Counted(s.graph.runner)}
    ms = step.time_one_row(s.graph.step, libraries, rounds=2, calls=3)
    assert set(ms) == {"reductions", "many"} and all(0 < t < 1e3 for t in ms.values())
    assert libraries["reductions"].rows == [1] * 6 and libraries["many"].rows == [2] * 6  # every round; one row, padded to two
    assert not any(t.any() for t in s.cache.keys + s.cache.values)  # a scratch cache: the server's is untouched


def test_no_library_serves_before_the_way_is_chosen(model):
    """The scheduler's thread keeps to the eager step until the way is chosen: a library handed over before would read
    plain weights that "packed" then frees."""
    s = Scheduler(copy.deepcopy(model), max_batch=2, context=64, compile=True)
    s.graph.choice_path = None
    seen = []
    s.graph.time_ways = lambda: seen.append((s.graph.ready, s.step_state())) or ("packed", FORCED)
    s.graph.build()
    assert seen == [(False, "building")] and s.graph.ready and s.step_state() == "compiled"


def test_a_second_server_finds_the_library_on_disk(model):
    _built(model)
    again = _built(model)  # a restarted server: nothing compiled
    assert again.graph.compile_seconds == 0 and "found in" in again.decoding(), again.decoding()


def test_the_library_reads_the_models_own_tensors_no_copy(model):
    """Weights changed in place after loading change what the libraries compute (two rows, and one): they hold
    pointers, not a copy."""
    c = model.config
    cache = lambda: [torch.randn(2, c.n_kv_head, 8, c.head_dim, generator=torch.Generator().manual_seed(i)) for i in range(c.n_layer)]  # noqa: E731
    for tokens, positions in [(torch.tensor([[3], [9]]), torch.tensor([2, 5])), (torch.tensor([[3]]), torch.tensor([4]))]:
        changed = copy.deepcopy(model)
        graph = _built(changed).graph
        before = graph(tokens, positions, cache(), cache())
        with torch.no_grad():
            changed.blocks[1].mlp.down_proj.weight.mul_(3.0)
            changed.wte.weight[3] += 1.0  # the tied head too
        after = graph(tokens, positions, cache(), cache())
        eager = DecodeStep(changed)(tokens, positions, row_mask(positions, int(positions.max()) + 1), cache(), cache())
        assert (after - before).abs().max() > 0.1
        torch.testing.assert_close(after, eager, atol=1e-5, rtol=0)
        assert graph.single is not None and not graph.failed and not graph.single_failed


@pytest.mark.cpu_paths  # oneDNN's packed layout and kernel follow the processor: run again on the lower path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_library_computes_with_the_weights_prepare_packed_for_onednn(model, dtype):
    """What a server holds: the model after decoding.prepare, its matrices in oneDNN's layout. The library serves what
    the eager step does with them, and reads those very tensors: one scaled in place changes what it computes."""
    from llmnb.decoding import PackedLinear, packable, prepare

    if not packable(dtype):
        pytest.skip(f"oneDNN does not pack {dtype} on this CPU")
    packed = prepare(copy.deepcopy(model), dtype)
    assert packed.decoding.packed > 0 and isinstance(packed.blocks[1].mlp.down_proj, PackedLinear)
    s = _built(packed)
    assert s.graph.single is None  # reductions read plain weights: one row is served as two
    tokens, logprobs = _joining_and_leaving(s)
    assert not s.graph.failed, s.graph.failed
    eager_tokens, eager_logprobs = _joining_and_leaving(Scheduler(packed, max_batch=3, context=64))
    assert tokens == eager_tokens
    torch.testing.assert_close(logprobs, eager_logprobs, atol=1e-5 if dtype == torch.float32 else 0.03, rtol=0)

    c, graph = packed.config, s.graph
    tokens, positions = torch.tensor([[3], [9]]), torch.tensor([2, 5])
    cache = lambda: [torch.randn(2, c.n_kv_head, 8, c.head_dim, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(c.n_layer)]  # noqa: E731
    atol = 1e-5 if dtype == torch.float32 else 0.01  # logits of order 0.3: bf16 keeps 8 bits
    before = graph(tokens, positions, cache(), cache())
    with torch.no_grad():
        for block in packed.blocks:
            block.mlp.down_proj.packed.mul_(10.0)
            block.attn.o_proj.packed.mul_(10.0)
    after = graph(tokens, positions, cache(), cache())
    eager = DecodeStep(packed)(tokens, positions, row_mask(positions, 6), cache(), cache())
    assert (after - before).abs().max() > 10 * atol
    torch.testing.assert_close(after, eager, atol=atol, rtol=0)


def test_a_server_loads_its_library_without_the_compilers_python_side():
    """The server process only loads the library: dynamo and sympy (80 MB resident) stay out of it; the child compiles."""
    import subprocess
    import sys

    code = ("import sys, torch; from llmnb.model import GPT, GPTConfig; from llmnb.serve.scheduler import Scheduler; "
            "m = GPT(GPTConfig.llama(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval(); "
            "s = Scheduler(m, max_batch=2, context=64, compile=True); s.graph.build(); assert s.graph.ready, s.decoding(); "
            "print(sorted(x for x in ('torch._dynamo', 'torch._inductor', 'sympy') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_librarys_name_follows_the_code_and_shapes_not_the_weights(model, monkeypatch):
    other_weights = GPT(model.config).eval()
    assert library_path(DecodeStep(other_weights)) == library_path(DecodeStep(model))
    deeper = GPT(GPTConfig.llama(vocab_size=97, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32)).eval()
    assert library_path(DecodeStep(deeper)) != library_path(DecodeStep(model))
    assert library_path(DecodeStep(copy.deepcopy(model).to(torch.bfloat16))) != library_path(DecodeStep(model))
    here = library_path(DecodeStep(model))
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # another kernel path: another library
    assert library_path(DecodeStep(model)) != here


def test_an_int8_model_with_bf16_activations_serves_what_its_eager_step_does(model):
    from llmnb.decoding import prepare
    from llmnb.quantize import quantize_model

    int8 = prepare(quantize_model(copy.deepcopy(model), "int8"), torch.bfloat16, pack=False)
    served = _built(int8)
    assert served.graph.single is None  # int8 layers keep their kernel: one row is served as two
    tokens, logprobs = _joining_and_leaving(served)
    eager_tokens, eager_logprobs = _joining_and_leaving(Scheduler(int8, max_batch=3, context=64))
    assert tokens == eager_tokens
    torch.testing.assert_close(logprobs, eager_logprobs, atol=0.03, rtol=0)  # one bf16 step of a log-probability near -4.6


def test_a_failed_build_says_why_and_serves_eagerly(model, monkeypatch, tmp_path):
    monkeypatch.setattr(step, "library_path", lambda _, rows="many": tmp_path / "step.pt2")  # nothing on disk: the child builds
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))  # Inductor's compiler, in the child
    s = Scheduler(model, max_batch=2, context=64, compile=True)
    with pytest.warns(UserWarning, match=r"the compiled step failed \(RuntimeError: building the step's library failed .*\); serving eagerly"):
        s.graph.build()
    assert s.step_state() == "eager" and s.decoding().startswith("eager: RuntimeError")
    assert not (tmp_path / "step.pt2").exists()
    seq = submit(s, [3, 4], Sampling(4, temperature=0))
    run_until_idle(s)
    assert seq.tokens == alone(model, [3, 4], 4, temperature=0)


def test_without_a_compiler_the_server_step_stays_eager_and_says_so(model, monkeypatch):
    monkeypatch.setattr(step, "compiler_available", lambda: False)
    s = Scheduler(model, max_batch=2, context=64, compile=True)
    with pytest.warns(UserWarning, match=r"no C\+\+ compiler .*; serving eagerly"):
        s.graph.build()
    assert not s.graph.ready and s.decoding() == "eager: no C++ compiler (g++, c++ or clang++) for Inductor"
    assert s.step_state() == "eager"  # not "building": a client waiting for the compiled step stops waiting
    seq = submit(s, [3, 4], Sampling(4, temperature=0))
    run_until_idle(s)
    assert seq.tokens == alone(model, [3, 4], 4, temperature=0)


def test_the_compiled_step_builds_in_the_background_while_serving_eagerly(model):
    """Timing the ways, maybe packing the weights, while the scheduler serves eagerly on them."""
    s = Scheduler(copy.deepcopy(model), max_batch=4, context=64, compile=True)
    s.graph.choice_path = None  # timed here, whatever an earlier test recorded
    s.start()
    seqs = [submit(s, [i + 1, i + 2], Sampling(5, temperature=0)) for i in range(6)]
    s.stop()
    s.builder.join()  # no build left running into the next tests
    assert [seq.tokens for seq in seqs] == [alone(model, [i + 1, i + 2], 5, temperature=0) for i in range(6)]
    assert s.graph.ready, s.decoding()
