"""Serving: an OpenAI-compatible server with continuous batching, metrics, API keys and a safety filter.

    llmnb serve MODEL_FOLDER --port 8000 --api-key KEY                   # the command line (llmnb.artifacts.latest(): the newest model)
    with local_server("smollm2-135m-instruct") as url: ...               # a server process for a notebook or a test

Modules: `scheduler` (continuous batching over a slot KV cache), `schemas` (request bodies),
`app` (the Starlette routes), `moderation` (safety filters), `metrics` (Prometheus),
`launch` (server processes, ours and llama.cpp's), `loadtest` (streaming HTTP clients under load).
"""
from .launch import free_port, llama_cpp_process, local_server, start_llama_cpp, start_server

__all__ = ["free_port", "llama_cpp_process", "local_server", "start_llama_cpp", "start_server"]
