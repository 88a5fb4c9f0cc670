"""Serving under load: our server with batching on and off, and llama.cpp's server, on the same model, with the same clients.

    python benchmarks/serve.py                      # the collection's latest SmolLM2 (notebook 05, else 04, else the base)
    python benchmarks/serve.py --seconds 10 --clients 1,16 --rates 1   # shorter

Each server runs alone, in its own process, one after another (on 2 cores, two at once ruin
both). Clients are real HTTP clients streaming server-sent events (llmnb.serve.loadtest); every
request asks for exactly --max-tokens tokens. Ours run without the safety filter (llama.cpp has none), plus one
point with it at 16 clients, to show its cost. "ours, compiled" is `llmnb serve --compile` (the step one
library compiled ahead of time, built in the background after the server is ready, or found in outputs/cache/steps/;
its sweep starts once /health says it is loaded, and how long that took is printed); `--int8` adds ours, eager and compiled, on notebook 06's int8
weights (llama.cpp keeps F16); "ours, fp32 eager" (one client) is where issue 23 started: the eager step on fp32
weights, which the compiled step is to beat 2x. Prints the table, and the ratios the issues target: at 16 clients batching
on / off (>= 4x), ours / llama.cpp (>= 1.0x); at 1 client the time per token (<= 1.3x llama.cpp's); each
server's resident memory against its weights and KV cache, and how much of it is pages of mapped files (shared
libraries: clean, and resident as far as the page cache holds them).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FP32 = "ours, fp32 eager"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder or registry name (default: llmnb.artifacts.latest(): the collection's latest model)")
    parser.add_argument("--gguf", default=None, help="the same model as GGUF for llama.cpp (default: written F16 next to it)")
    parser.add_argument("--clients", default="1,2,4,8,16,32")
    parser.add_argument("--rates", default="0.5,1,2", help="Poisson arrival rates, requests per second")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled server (its first build takes a minute or two on 2 cores)")
    parser.add_argument("--int8", action="store_true", help="also serve the model in notebook 06's int8 (eager and, unless --no-compile, "
                                                            "compiled); llama.cpp keeps the F16 file")
    args = parser.parse_args()

    import httpx
    import pandas as pd
    import torch

    from llmnb import checkpoint, decoding, hardware
    from llmnb.quantize import model_bytes

    from llmnb.serve import llama_cpp_process, local_server
    from llmnb.serve.loadtest import closed_loop, poisson, warm_up
    from llmnb.serve.scheduler import cache_bytes
    from llmnb import artifacts

    model = args.model or str(artifacts.latest("smollm2-135m-instruct"))
    gguf = args.gguf or str(artifacts.ensure("gguf", model=model, qtype="F16"))
    name = Path(model).name
    clients = [int(c) for c in args.clients.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    slots = max(clients)
    print(f"model {model}, GGUF {gguf}; torch {torch.__version__}, {os.cpu_count()} CPUs; {args.seconds:.0f} s a point")

    memory: dict[str, tuple[int, int, int]] = {}  # server -> (resident bytes after its sweep, peak during it, of them file pages)
    served: dict[str, str] = {}  # our servers -> the folder each serves

    def sweep(server, server_name: str, folder: str | None = None) -> list[dict]:
        """The load points on one server, then its memory: resident once idle, and the peak from the warm-up on (the
        load's peak, PyTorch's fp32 weights before the cast, left out); `folder`: ours, measured against its weights."""
        pid = server.process.pid
        hardware.reset_peak_resident(pid)
        warm_up(server.url, name, max(clients))
        rows = [closed_loop(server.url, name, c, args.seconds, args.max_tokens, server=server_name) for c in clients]
        rows += [poisson(server.url, name, r, args.seconds, args.max_tokens, server=server_name) for r in rates]
        time.sleep(1)  # the scheduler hands its freed heap back once idle
        memory[server_name] = (*hardware.resident_bytes(pid), hardware.file_backed_bytes(pid))
        if folder:
            served[server_name] = folder
        return rows

    rows, started = [], time.perf_counter()
    common = ("--context", str(args.context), "--moderation", "none")
    launched = time.perf_counter()
    with local_server(model, "--max-batch", str(slots), *common) as server:
        ready = time.perf_counter() - launched
        health = httpx.get(f"{server.url}/health").json()
        rows += sweep(server, "ours, batching on", model)
    with local_server(model, "--max-batch", "1", *common) as server:
        rows += sweep(server, "ours, batching off")
    with local_server(model, "--max-batch", str(slots), "--context", str(args.context)) as server:  # the default safety filter on
        warm_up(server.url, name, 16)
        rows.append(closed_loop(server.url, name, 16, args.seconds, args.max_tokens, server="ours, batching on, safety filter"))
    def compiled_sweep(folder: str, server_name: str) -> None:
        with local_server(folder, "--max-batch", str(slots), "--compile", "--name", name, *common) as server:
            launched = time.perf_counter()
            step = server.wait_step()["decoding"]
            print(f"{server_name}: {step} ({time.perf_counter() - launched:.0f} s after /health first said 200)", flush=True)
            rows.extend(sweep(server, server_name, folder))

    if not args.no_compile:
        compiled_sweep(model, "ours, compiled")
    if args.int8:
        int8 = str(artifacts.ensure("quantized", model=model, scheme="int8"))
        with local_server(int8, "--max-batch", str(slots), "--name", name, *common) as server:  # the id the clients send
            rows += sweep(server, "ours, int8", int8)
        if not args.no_compile:
            compiled_sweep(int8, "ours, int8 compiled")
    # issue 23's starting point: the eager step on fp32 weights (one client only: what its 2x target is measured against)
    with local_server(model, "--max-batch", str(slots), "--dtype", "float32", *common) as server:
        warm_up(server.url, name, 1)
        rows.append(closed_loop(server.url, name, 1, args.seconds, args.max_tokens, server=FP32))
    with llama_cpp_process(gguf, n_parallel=slots, context=args.context) as server:
        llama = f"llama.cpp ({Path(gguf).stem.split('.')[-1]})"
        rows += sweep(server, llama)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    print(table.round(1).to_string(index=False))
    at16 = table[table.clients == 16].set_index("server")["output tok/s"]
    ours = list(served)
    if 16 in clients:
        on, off, filtered = at16["ours, batching on"], at16["ours, batching off"], at16["ours, batching on, safety filter"]
        llama_tps = at16[llama]
        print(f"\nat 16 clients: batching on / off = {on / off:.2f}x (target >= 4); the safety filter keeps {filtered / on:.2f}x "
              f"of ours' throughput; " + ", ".join(f"{o} / llama.cpp = {at16[o] / llama_tps:.2f}x" for o in ours) + " (target >= 1.0)")
    at1 = table[table.clients == 1].set_index("server")["TPOT p50 ms"]
    print(f"\nours decodes as: {health['decoding']}; ready (/health 200) {ready:.0f} s after launch")
    for o in ours:
        print(f"at 1 client, time per output token: {o} {at1[o]:.1f} ms, llama.cpp {at1.iloc[-1]:.1f} ms: "
              f"{at1[o] / at1.iloc[-1]:.2f}x (target <= 1.3)")
    if "ours, compiled" in at1:
        print(f"at 1 client, ours, compiled is {at1[FP32] / at1['ours, compiled']:.2f}x faster than {FP32} ({at1[FP32]:.1f} ms, "
              f"the path issue 23 started from; target >= 2) and {at1['ours, batching on'] / at1['ours, compiled']:.2f}x "
              f"faster than ours, eager in the processor's precision")
    for o in ours:
        prepared = decoding.prepare(checkpoint.load(served[o])[0])  # what the server holds: its weights and its KV cache's size
        weights = model_bytes(prepared)
        cache = cache_bytes(prepared, slots, args.context, prepared.decoding.dtype, compile="compiled" in o)
        rss, peak, files = memory[o]
        print(f"resident memory: {o} {rss / 1e6:.0f} MB = weights {weights / 1e6:.0f} MB + KV cache {cache / 1e6:.0f} MB "
              f"+ {(rss - weights - cache) / 1e6:.0f} MB (target: <= 300 MB above the two), of which {files / 1e6:.0f} MB "
              f"mapped files; peak while serving {peak / 1e6:.0f} MB, {(peak - weights - cache) / 1e6:.0f} MB above")
    print(f"resident memory: {llama} {memory[llama][0] / 1e6:.0f} MB, of which {memory[llama][2] / 1e6:.0f} MB mapped files "
          f"(its weights among them); peak while serving {memory[llama][1] / 1e6:.0f} MB")
    print("mapped files: clean pages of shared libraries (and llama.cpp's GGUF), resident as far as the page cache holds them: "
          "the same server counts tens of MB more right after an install than after `echo 3 > /proc/sys/vm/drop_caches`")
    print(f"took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
