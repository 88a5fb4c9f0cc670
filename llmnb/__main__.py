"""Command line: `python -m llmnb run|assets|info|serve|serve-gguf` (also installed as `llmnb`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmnb", description="Run the llmnb notebooks and prepare their offline assets.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="execute the numbered notebooks with papermill and write a report")
    run_p.add_argument("--preset", default="auto", help="smoke, cpu, gpu or auto (gpu when CUDA is present, else cpu)")
    run_p.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 01,03")
    run_p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="papermill parameter (repeatable)")
    run_p.add_argument("--out", type=Path, default=None, help="folder for executed notebooks and the report (default outputs/runs/<preset>)")
    run_p.add_argument("--commit", action="store_true", help="regenerate the committed notebooks: every notebook at the cpu preset, "
                       "from a clean outputs/ (the old one moved to outputs/previous/), written back to notebooks/ (make notebooks)")
    assets_p = sub.add_parser("assets", help="install and prepare the offline corpus, tokenizer files and model")
    assets_p.add_argument("--no-model", action="store_true", help="skip the SmolLM2 conversion (~20 s, 540 MB)")
    sub.add_parser("info", help="print this machine's CPU, RAM, GPU, disk and library versions")
    serve_p = sub.add_parser("serve", help="serve a model with an OpenAI-compatible API (see README: Deploying)")
    serve_p.add_argument("model", help="a registry name (smollm2-135m-instruct), a model folder (quantized too), or a hub id")
    serve_p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve_p.add_argument("--port", type=int, default=8000)
    serve_p.add_argument("--api-key", default=os.environ.get("LLMNB_API_KEY"), help="required as 'Authorization: Bearer KEY' (default $LLMNB_API_KEY)")
    serve_p.add_argument("--adapter", default=None, help="a LoRA adapter folder (peft format) to merge onto the model")
    serve_p.add_argument("--name", default=None, help="the model id clients send (default: the folder or registry name)")
    serve_p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (1 = batching off)")
    serve_p.add_argument("--context", type=int, default=None, help="tokens per request, prompt + reply (default: the model's, at most 2048)")
    serve_p.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 429")
    serve_p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    serve_p.add_argument("--moderation", default="profanity", help="profanity (alt-profanity-check), none, or hf:MODEL[:LABEL]")
    serve_p.add_argument("--moderation-threshold", type=float, default=None)
    serve_p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                         help="decoding precision (default auto: bf16 where the CPU has AVX-512 BF16 or AMX, else fp32)")
    serve_p.add_argument("--compile", action="store_true",
                         help="decode with one compiled library per step (the first time built in the background for a minute or "
                              "two, eager meanwhile; kept in outputs/cache/steps/ for the next start; it reads the model's "
                              "own weights: benchmarks/serve.py)")
    gguf_p = sub.add_parser("serve-gguf", help="serve a GGUF file with llama.cpp's own server (xllamacpp)")
    gguf_p.add_argument("gguf")
    gguf_p.add_argument("--host", default="127.0.0.1")
    gguf_p.add_argument("--port", type=int, default=8080)
    gguf_p.add_argument("--parallel", type=int, default=8, help="slots decoded together")
    gguf_p.add_argument("--context", type=int, default=2048, help="tokens per slot")
    gguf_p.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    if args.command == "serve":
        return _serve(args)
    if args.command == "serve-gguf":
        from .serve.launch import serve_gguf

        try:
            return serve_gguf(args.gguf, args.port, args.parallel, args.context, args.threads, args.host)
        except FileNotFoundError as exc:
            print(f"llmnb serve-gguf: {exc}", file=sys.stderr)
            return 2

    if args.command == "run":
        from .runner import parse_parameter, run

        params = {name: parse_parameter(value) for name, value in args.parameter}
        try:
            results, report = run(args.preset, [n for n in args.only.split(",") if n] or None, params, args.out, args.commit)
        except (ValueError, FileNotFoundError) as exc:
            print(f"llmnb run: {exc}", file=sys.stderr)
            return 2
        print(f"report: {report}")
        failed = [r for r in results if r.status == "failed"]
        for r in failed:
            print(f"llmnb run: {r.name} failed at {r.error}", file=sys.stderr)
        return 1 if failed else 0
    if args.command == "assets":
        from .assets import AssetError, prepare_all
        from .data import CorpusError

        try:
            done = prepare_all(with_model=not args.no_model)
        except (AssetError, CorpusError) as exc:
            print(f"llmnb assets: {exc}", file=sys.stderr)
            return 1
        for name, what in done.items():
            print(f"{name}: {what}")
        return 0
    from .hardware import machine_info

    print(json.dumps(machine_info().as_dict(), indent=2))
    return 0


def _serve(args) -> int:
    import uvicorn

    from .hardware import limit_heap_arenas, limit_kernel_caches
    from .serve.app import ServeConfig, create_app

    limit_heap_arenas()  # before the loading, scheduling and HTTP threads start: one arena, which an idle trim empties
    # before the first matrix product (packing included): up to 1024 kernels kept, one per prompt length and shape. A
    # compiled server sets its own once it knows its weights' layout (serve.served.Served.load)
    if not args.compile:
        limit_kernel_caches(packed=True)

    if args.max_batch < 1 or args.max_waiting < 0 or args.max_body_bytes < 1:
        print("llmnb serve: --max-batch and --max-body-bytes must be >= 1, --max-waiting >= 0", file=sys.stderr)
        return 2
    if args.adapter and not Path(args.adapter, "adapter_config.json").is_file():
        print(f"llmnb serve: {args.adapter} is not a LoRA adapter folder (no adapter_config.json)", file=sys.stderr)
        return 2
    config = ServeConfig(args.model, args.adapter, args.name, args.api_key, args.max_batch, args.context, args.max_waiting,
                         args.max_body_bytes, args.moderation, args.moderation_threshold, args.dtype,
                         args.compile)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"llmnb serve: listening on {args.host} without an API key: anyone who reaches this port can use the model", file=sys.stderr)
    def cannot_serve(reason: str) -> None:  # a server that cannot serve says why and exits, rather than answering 503 forever
        print(f"llmnb serve: cannot serve {args.model}: {reason}", file=sys.stderr, flush=True)
        os._exit(2)

    # uvicorn stops accepting on SIGTERM and waits for the requests in flight (streams too) before the app shuts down;
    # no WebSocket route, so none of uvicorn's WebSocket protocols is imported
    uvicorn.run(create_app(config, on_load_error=cannot_serve), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=120, ws="none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
