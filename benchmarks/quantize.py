"""Smaller models: llmnb.quantize vs bitsandbytes, torchao and llama.cpp, pruning, and ONNX Runtime, as ratios to fp32.

    .venv/bin/python benchmarks/quantize.py                      # SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/quantize.py --model outputs/models/llmnb-shakespeare --windows 8

Per contender, in one process, one after another: the bytes of its weights (in memory for the
torch models, the file for llama.cpp), perplexity on held-out Shakespeare (windows of 256 tokens
of the validation split), and greedy decoding tokens/s at batch 1 with the KV cache (best of
`--repeats` after a warm-up). llama.cpp (xllamacpp) runs the GGUF files llmnb.gguf writes; its
perplexity is that of the weights the file stores, computed by our model (llama.cpp's API gives
log-probabilities of generated tokens only), and its speed is its own `predicted_per_second`.
Pruned models (llmnb.prune, calibrated on 8 x 128 tokens of the training plays) are the dense model with zeros
(Wanda 50 %, 2:4) or a smaller one (structured); ONNX Runtime runs the graph llmnb.onnx_runtime exports, in fp32
and ORT's int8 (bytes: the file).
Targets (issue 12): int8 <= 0.27x the fp32 bytes with perplexity within 1 %; int4 <= 0.16x with
perplexity no worse than bitsandbytes NF4; our int8 decoding >= 1.5x our fp32 decoding (issue 23: int4 >= 2x, and
time per token <= 1.3x llama.cpp F16's). "prepared" and "compiled" rows are the model after `llmnb.decoding.prepare`
(its dtype in the name; compiled: each step one Inductor graph, compiled during the warm-up, its time printed apart).
"""
from __future__ import annotations

import argparse
import copy
import logging
import warnings

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per speed measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from llmnb import checkpoint, data, decoding, evaluation, prune
    from llmnb import gguf as gg
    from llmnb import onnx_runtime as ox
    from llmnb import quantize as q
    from llmnb.paths import outputs_dir

    model, tokenizer = checkpoint.load(args.model)
    cleaned, _ = data.clean(data.load_corpus("shakespeare"))
    train_docs, val_docs = data.split_documents(cleaned.documents, 0.1)
    val = "\n\n".join(d.text for d in val_docs)
    calibration = torch.tensor(tokenizer.encode("\n\n".join(d.text for d in train_docs[::max(1, len(train_docs) // 32)]))[:8 * 128]).view(8, 128)
    ids = torch.tensor(tokenizer.encode(val[: args.windows * 256 * 8])[: args.windows * 256]).view(args.windows, 256)
    prompt = ids[:1, :16]
    rows = {}

    def torch_row(name, m):
        rows[name] = {"bytes": q.model_bytes(m), "perplexity": evaluation.perplexity(m, ids),
                      "tokens/s": q.decode_speed(m, prompt, args.tokens, repeats=args.repeats)}
        print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)

    torch_row("fp32 (ours)", model)
    for label, quantized in [("", model), ("int8 ", q.quantize_model(copy.deepcopy(model), "int8")),
                             ("int4 g32 ", q.quantize_model(copy.deepcopy(model), "int4", 32))]:
        for compiled in (False, True):
            prepared = decoding.prepare(copy.deepcopy(quantized), compile=compiled)
            torch_row(f"{label}{'compiled' if compiled else 'prepared'} ({prepared.decoding.dtype}) (ours)".replace("torch.", ""), prepared)
            if compiled:
                print(f"  {prepared.decoding}; compiled in {prepared.decoding.step.compile_seconds:.0f} s", flush=True)
    for scheme, group in [("int8", 64), ("int8-dynamic", 64), ("int4", 32), ("int4", 64), ("nf4", 64)]:
        try:
            torch_row(f"{scheme} g{group} (ours)" if scheme.startswith("int4") else f"{scheme} (ours)",
                      q.quantize_model(copy.deepcopy(model), scheme, group))
        except ValueError as error:
            print(f"{scheme} g{group}: skipped: {error}")
    for library in ("bnb-int8", "bnb-nf4", "torchao-int8"):
        torch_row(library, q.reference_model(model, library))
    for label, how in [("Wanda 50% (zeros, dense storage)", ("wanda", "unstructured")), ("Wanda 2:4 (zeros, dense storage)", ("wanda", "2:4"))]:
        pruned = copy.deepcopy(model)
        prune.prune_model(pruned, how[0], 0.5, how[1], calibration=calibration)
        torch_row(label, pruned)
    if model.config.flavour == "llama":
        torch_row("structured: 25% of MLP neurons, 1/3 of heads", prune.prune_structured(model, calibration, 0.25, 0.34))
    torch_row("structured: 25% of MLP neurons", prune.prune_structured(model, calibration, 0.25))
    onnx_dir = ox.export(model, tokenizer, outputs_dir("benchmarks", "onnx")).parent
    ox.quantize_int8(onnx_dir)
    for label, file in [("ONNX Runtime fp32", ox.FP32_FILE), ("ONNX Runtime int8", ox.INT8_FILE)]:
        runner = ox.OnnxModel(onnx_dir / file)
        rows[label] = {"bytes": sum(p.stat().st_size for p in onnx_dir.glob(file + "*")), "perplexity": evaluation.perplexity(runner, ids),
                       "tokens/s": runner.decode_speed(prompt, args.tokens, repeats=args.repeats)}
        print(label, rows[label], flush=True)
    folder = outputs_dir("benchmarks", "gguf")
    for qtype in ("F16", "Q8_0", "Q4_0"):
        path = gg.write_gguf(model, tokenizer, folder / f"model.{qtype}.gguf", qtype)
        speed = gg.llama_cpp_decode_speed(path, prompt[0].tolist(), args.tokens, repeats=args.repeats)  # in a process of its own
        weights = gg.file_weights(model, qtype) if model.config.flavour == "llama" else model
        rows[f"llama.cpp {qtype}"] = {"bytes": path.stat().st_size, "perplexity": evaluation.perplexity(weights, ids), "tokens/s": speed}
        print(f"llama.cpp {qtype}", rows[f"llama.cpp {qtype}"], flush=True)

    print("\nwhere a decoding step's time goes (torch profiler, 16 tokens at batch 1):")
    matmul_ops = {"aten::mm", "aten::addmm", "aten::_weight_int8pack_mm"}
    for name, m in [("fp32", model), ("int8", q.quantize_model(copy.deepcopy(model), "int8"))]:
        q.decode_speed(m, prompt, 2, repeats=1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            q.decode_speed(m, prompt, 16, repeats=1)
        events = prof.key_averages()
        matmul = sum(e.self_cpu_time_total for e in events if e.key in matmul_ops) / 1e3
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        print(f"- {name}: matmuls {matmul:.0f} ms of {total:.0f} ms; the rest (norms, attention, rotary, cache, casts) {total - matmul:.0f} ms")

    base = rows["fp32 (ours)"]
    print("\n| contender | MB | perplexity | decode tok/s (batch 1) | bytes / fp32 | perplexity / fp32 | speed / fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['bytes'] / 1e6:.1f} | {r['perplexity']:.2f} | {r['tokens/s']:.1f} | {r['bytes'] / base['bytes']:.3f} | "
              f"{r['perplexity'] / base['perplexity']:.4f} | {r['tokens/s'] / base['tokens/s']:.2f} |")
    int8, nf4 = rows["int8 (ours)"], rows["bnb-nf4"]
    int4 = min((r for n, r in rows.items() if n.startswith("int4")), key=lambda r: r["perplexity"])
    print("\ntargets:")
    print(f"- int8 bytes {int8['bytes'] / base['bytes']:.3f}x (<= 0.27), perplexity {int8['perplexity'] / base['perplexity'] - 1:+.2%} (within 1 %)")
    print(f"- best int4 bytes {int4['bytes'] / base['bytes']:.3f}x (<= 0.16), perplexity {int4['perplexity']:.2f} vs bitsandbytes NF4 {nf4['perplexity']:.2f}")
    print(f"- int8 decoding {int8['tokens/s'] / base['tokens/s']:.2f}x our fp32 (>= 1.5)")
    fastest = {kind: max((r["tokens/s"], n) for n, r in rows.items() if n.startswith(kind) and n.endswith("(ours)"))
               for kind in ("prepared", "compiled", "int8 prepared", "int8 compiled", "int4 g32 prepared", "int4 g32 compiled")}
    for kind, (speed, name) in fastest.items():
        print(f"- {name}: {speed / base['tokens/s']:.2f}x our fp32 (int8 >= 1.5, int4 >= 2), "
              f"{rows['llama.cpp F16']['tokens/s'] / speed:.2f}x llama.cpp F16's time per token (<= 1.3)")


if __name__ == "__main__":
    main()
