"""The sizes every notebook runs at, in one place.

`smoke` is for CI (the whole collection in a few minutes on 2 cores), `cpu` gives
results worth looking at on a laptop in tens of minutes, `gpu` is Colab-T4-to-A100
scale. `auto` picks `gpu` when CUDA is present, else `cpu`; the `LLMNB_PRESET`
environment variable overrides `auto` (tests set it to `smoke`).

A notebook's `parameters` cell names every knob with the value None, meaning "take
it from the preset"; papermill (`llmnb run -p NAME VALUE`) overrides any of them.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch

from .paths import SMOKE

PRESET_NAMES = (SMOKE, "cpu", "gpu")

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "00": dict(
            measure_layers=4, measure_width=256, measure_heads=4, measure_vocab=8192,
            measure_seq=256, measure_batch=8, measure_steps=2, matmul_size=256,
            inference_context=2048, inference_batch=1,
        ),
        "01": dict(vocab_size=1024, compression_sizes=[300, 512, 1024], val_fraction=0.1, toy_merges=8),
        "03": dict(budget_seconds=10, max_steps=40, eval_interval=20, char_steps=40, scaling_steps=0, batch_size=8, block_size=64, n_layer=2,
                   zero_layers=2, zero_width=256, tp_width=128, recipe_width=64, recipe_steps=20, compile_training=False),
        "02": dict(demo_layers=2, demo_width=64, demo_heads=4, kv_lengths=[16, 32, 64], kv_new_tokens=4, pattern_layer=3),
        "04": dict(base_model="smollm2-tiny-random", n_train=48, n_test=8, n_dialogue_train=16, n_dialogue_test=4, main_steps=3, batch_size=4, lora_rank=8, lr=1e-3,
                   block_size=160, table_steps=1, table_test=4, table_ranks=[8], trl_steps=2, wiki_windows=1, max_new_tokens=4, memory_steps=1),
        "05": dict(base_model="smollm2-tiny-random", n_prompts=16, n_val=8, n_test=8, pref_prompts=8, pref_samples=2, n_style=8,
                   lora_rank=4, lr=5e-4, ppo_lr=5e-4, rm_lr=1e-3, grpo_lrs=[5e-4], kl_coef=0.05, dpo_beta=0.1, dpo_sft=1.0, rm_steps=2, batch_size=4,
                   method_seconds=60.0, check_seconds=60.0, max_steps=2, prompts_per_step=4, grpo_prompts=2, group_size=2, max_new_tokens=4, trl_steps=1),
        "06": dict(base_model="smollm2-tiny-random", eval_windows=2, window=64, n_task=8, gen_tokens=4, gguf_types=["F16", "Q4_0"],
                   agreement_tokens=8, storage_context=512, sparsities=[0.5], calibration_rows=2, calibration_length=32,
                   structured_mlp=0.25, structured_heads=0.5, heal_steps=2, compiled_variants=[]),
        "07": dict(base_model="smollm2-tiny-random", max_batch=8, context=256, demo_requests=6, demo_tokens=8, load_clients=[1, 4],
                   load_rates=[4.0], load_seconds=1.0, load_tokens=12, answer_tokens=12, compiled_int8=False),
        "08": dict(base_model="smollm2-tiny-random", lastword=8, nextline=8, arithmetic=8, passages=2, passage_chars=400, batch_size=8,
                   hub_tasks=[]),
    },
    "cpu": {
        "00": dict(
            measure_layers=6, measure_width=384, measure_heads=6, measure_vocab=50257,
            measure_seq=256, measure_batch=8, measure_steps=3, matmul_size=1024,
            inference_context=4096, inference_batch=1,
        ),
        "01": dict(vocab_size=4096, compression_sizes=[300, 512, 1024, 2048, 4096, 8192], val_fraction=0.1, toy_merges=8),
        "03": dict(budget_seconds=90, max_steps=None, eval_interval=100, char_steps=400, scaling_steps=70, batch_size=16, block_size=128, n_layer=4,
                   zero_layers=8, zero_width=512, tp_width=512, recipe_width=128, recipe_steps=300,
                   compile_training=False),  # 2 cores: compiling repays after thousands of steps, more than 90 s holds
        "02": dict(demo_layers=4, demo_width=128, demo_heads=4, kv_lengths=[64, 128, 256, 512, 1024], kv_new_tokens=6, pattern_layer=3),
        "04": dict(base_model="smollm2-135m-instruct", n_train=2000, n_test=100, n_dialogue_train=400, n_dialogue_test=32, main_steps=40, batch_size=8, lora_rank=16, lr=1e-3,
                   block_size=160, table_steps=2, table_test=16, table_ranks=[8, 32], trl_steps=6, wiki_windows=8, max_new_tokens=32, memory_steps=2),
        "05": dict(base_model="smollm2-135m-instruct", n_prompts=400, n_val=128, n_test=320, pref_prompts=96, pref_samples=4,
                   n_style=32, lora_rank=16, lr=2e-4, ppo_lr=5e-5, rm_lr=1e-3, grpo_lrs=[1e-4, 3e-4], kl_coef=0.05, dpo_beta=0.1, dpo_sft=1.0, rm_steps=5,
                   batch_size=8, method_seconds=20.0, check_seconds=10.0, max_steps=1000, prompts_per_step=8, grpo_prompts=4, group_size=8,
                   max_new_tokens=8, trl_steps=1),
        "06": dict(base_model="smollm2-135m-instruct", eval_windows=4, window=256, n_task=40, gen_tokens=12,
                   gguf_types=["F16", "Q8_0", "Q4_0"], agreement_tokens=64, storage_context=4096, sparsities=[0.5, 0.7],
                   calibration_rows=4, calibration_length=128, structured_mlp=0.25, structured_heads=0.34, heal_steps=6,
                   compiled_variants=["int8"]),
        "07": dict(base_model="smollm2-135m-instruct", max_batch=16, context=512, demo_requests=8, demo_tokens=24, load_clients=[1, 4, 16],
                   load_rates=[1.0], load_seconds=4.0, load_tokens=32, answer_tokens=40, compiled_int8=True),
        "08": dict(base_model="smollm2-135m-instruct", lastword=96, nextline=64, arithmetic=96, passages=6, passage_chars=1200, batch_size=16,
                   hub_tasks=[]),
    },
    "gpu": {
        "00": dict(
            measure_layers=12, measure_width=768, measure_heads=12, measure_vocab=50257,
            measure_seq=1024, measure_batch=8, measure_steps=5, matmul_size=8192,
            inference_context=8192, inference_batch=8,
        ),
        "01": dict(vocab_size=16384, compression_sizes=[300, 1024, 4096, 8192, 16384, 32768], val_fraction=0.1, toy_merges=8),
        "03": dict(budget_seconds=1200, max_steps=None, eval_interval=250, char_steps=5000, scaling_steps=2000, batch_size=32, block_size=512, n_layer=8,
                   zero_layers=8, zero_width=512, tp_width=512, recipe_width=256, recipe_steps=2000,
                   compile_training=True),  # on an H200 the compiled step ran 1.24x eager at these sizes (benchmarks/README.md)
        "02": dict(demo_layers=12, demo_width=768, demo_heads=12, kv_lengths=[256, 512, 1024, 2048, 4096], kv_new_tokens=16, pattern_layer=3),
        "04": dict(base_model="smollm2-135m-instruct", n_train=5000, n_test=300, n_dialogue_train=4000, n_dialogue_test=200, main_steps=400, batch_size=32, lora_rank=16, lr=1e-3,
                   block_size=256, table_steps=50, table_test=200, table_ranks=[8, 32, 128], trl_steps=100, wiki_windows=32, max_new_tokens=32,
                   memory_steps=3),
        "05": dict(base_model="smollm2-135m-instruct", n_prompts=2000, n_val=400, n_test=1000, pref_prompts=500, pref_samples=8,
                   n_style=400, lora_rank=16, lr=2e-4, ppo_lr=5e-5, rm_lr=1e-3, grpo_lrs=[1e-4, 3e-4, 1e-3], kl_coef=0.05, dpo_beta=0.1, dpo_sft=1.0, rm_steps=200,
                   batch_size=32, method_seconds=600.0, check_seconds=60.0, max_steps=5000, prompts_per_step=64, grpo_prompts=16, group_size=8,
                   max_new_tokens=16, trl_steps=20),
        "06": dict(base_model="smollm2-135m-instruct", eval_windows=32, window=512, n_task=300, gen_tokens=64,
                   gguf_types=["F16", "Q8_0", "Q4_0"], agreement_tokens=64, storage_context=8192, sparsities=[0.25, 0.5, 0.7],
                   calibration_rows=64, calibration_length=256, structured_mlp=0.25, structured_heads=0.34, heal_steps=50,
                   compiled_variants=[]),  # on a GPU our int8/int4 layers have no kernel of their own (they dequantize before each
                                           # product); the compiled step itself, as a CUDA graph, is measured in benchmarks/generation.py
        "07": dict(base_model="smollm2-135m-instruct", max_batch=32, context=2048, demo_requests=16, demo_tokens=64, load_clients=[1, 4, 16, 32],
                   load_rates=[1.0, 4.0], load_seconds=20.0, load_tokens=128, answer_tokens=128,
                   compiled_int8=False),  # the server's compiled step (an AOTInductor library) is built and tested on CPUs only
        "08": dict(base_model="smollm2-135m-instruct", lastword=1000, nextline=400, arithmetic=1000, passages=40, passage_chars=2000, batch_size=32,
                   hub_tasks=["hellaswag", "arc_easy", "lambada_openai"]),
    },
}


def resolve_preset(name: str) -> str:
    """Turn `auto` into a concrete preset name; reject unknown names."""
    if name == "auto":
        name = os.environ.get("LLMNB_PRESET", "")
        if not name:
            name = "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESET_NAMES)} or 'auto'")
    return name


def configure(notebook: str, preset: str, **overrides: Any) -> SimpleNamespace:
    """The preset's values for `notebook`, with every override that is not None applied.

    An override that the preset does not know is refused: a typo in `-p` must not
    silently fall back to the default.
    """
    name = resolve_preset(preset)
    try:
        values = dict(PRESETS[name][notebook])
    except KeyError:
        raise ValueError(f"preset {name!r} has no values for notebook {notebook!r}; add them to llmnb/presets.py") from None
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for notebook {notebook}; known: {sorted(values)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    for key, value in given.items():
        _check_type(notebook, key, value, values[key])
    values.update(given)
    if name == SMOKE:  # a smoke notebook started by hand writes under outputs/smoke/ too (paths.outputs_dir)
        os.environ["LLMNB_PRESET"] = name
    return SimpleNamespace(preset=name, **values)


def _check_type(notebook: str, name: str, value: Any, default: Any) -> None:
    """Refuse a parameter whose type differs from the preset's value (an int where a float is expected is fine)."""
    if default is None:
        return
    expected = type(default)
    numeric = expected is float and isinstance(value, int)
    if isinstance(value, bool) != isinstance(default, bool) or not (isinstance(value, expected) or numeric):
        raise ValueError(f"parameter {name!r} of notebook {notebook} expects {expected.__name__} (the preset has {default!r}), "
                         f"got {value!r} ({type(value).__name__})")
