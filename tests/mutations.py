"""Break llmnb one plausible line at a time and check that the suite notices: a hand-run mutation test.

    .venv/bin/python tests/mutations.py                # every mutation (several minutes: some run torchrun)
    .venv/bin/python tests/mutations.py --only gelu    # those whose name contains "gelu"

Each mutation is applied to a fresh copy of the repository (package and tests), then the tests
named for it run there (PYTHONPATH puts the copy first, subprocesses included). A mutation
that no test fails is MISSED: the suite has a hole there. Not run in CI (pytest collects
`test_*.py` only). New stages add their wrong versions to MUTATIONS; mutmut and cosmic-ray
were not used because their random operators mostly flip constants no test can see, while
these are the mistakes a person actually makes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


T = "tests/test_train.py::"
A = "tests/test_align.py::"
Q = "tests/test_quantize.py::"
G = "tests/test_gguf.py::"
P = "tests/test_prune.py::"
S = "tests/test_serve_scheduler.py::"
MUTATIONS = [
    Mutation("DDP gradients summed over ranks, not averaged", "llmnb/train.py", "scaler.scale(loss * weights[micro]).backward()",
             "scaler.scale(loss * weights[micro] * world_size()).backward()",
             (T + "test_two_processes_match_one_process_with_the_same_global_batch", T + "test_two_nodes_of_one_process_each_match_one_process")),
    Mutation("RNG state not restored on resume", "llmnb/train.py", 'set_rng_state(state["rng"])  # last', "pass  # last",
             (T + "test_resumed_run_continues_the_same_loss_curve_with_dropout_on",)),
    Mutation("AdamW state left out of the memory estimate", "llmnb/budget.py", '"fp32": (4.0, 4.0, 8.0, 4.0)', '"fp32": (4.0, 4.0, 0.0, 4.0)',
             ("tests/test_budget.py",)),
    Mutation("exact GELU instead of GPT-2's tanh approximation", "llmnb/model.py", 'approximate="tanh"', 'approximate="none"',
             ("tests/test_model.py",)),
    Mutation("decoding's query heads read the wrong key/value head", "llmnb/model.py",
             "grouped = _fp32_or_wider(q.reshape(b, n_kv, nh // n_kv, hs))",
             "grouped = _fp32_or_wider(q.reshape(b, nh // n_kv, n_kv, hs).transpose(1, 2))",
             ("tests/test_model.py::test_one_query_attention_equals_sdpa_on_repeated_heads",
              "tests/test_model.py::test_decoding_one_token_at_a_time_matches_transformers")),
    Mutation("the one-row reduction drops the layer's bias", "llmnb/decoding.py",
             "            y = y + self.bias.float()", "            y = y",
             ("tests/test_decoding.py::test_a_row_linear_compiled_computes_the_layer_and_eagerly_is_the_layer",)),
    Mutation("q, k and v stacked in another order than they are split", "llmnb/model.py",
             "return self.qkv(x).split([self.config.attn_dim, kv_dim, kv_dim], dim=-1)",
             "return self.qkv(x).split([kv_dim, self.config.attn_dim, kv_dim], dim=-1)",
             ("tests/test_decoding.py::test_packed_weights_compute_what_the_plain_ones_do",)),
    Mutation("log-probabilities read one position late", "llmnb/model.py", "logits[:, :-1].float()", "logits[:, 1:].float()",
             ("tests/test_model.py::test_token_logprobs_equal_a_direct_computation_and_transformers",)),
    Mutation("prompt tokens leak into the supervised loss", "llmnb/data.py", "np.where(learn[1:], tokens[1:], -100)", "np.where(learn[:-1], tokens[1:], -100)",
             ("tests/test_data.py::test_prompt_masked_pairs_learn_only_the_response_padded_or_packed",)),
    Mutation("frozen parameters handed to the optimizer", "llmnb/train.py", "if not p.requires_grad or id(p) in seen:", "if id(p) in seen:",
             (T + "test_only_parameters_that_require_grad_train_and_pairs_mask_the_prompt",)),
    Mutation("sampled log-probabilities taken after temperature", "llmnb/generate.py", "logprob = logits.log_softmax(-1)",
             "logprob = (logits / max(temperature, 1e-5)).log_softmax(-1)", ("tests/test_generate.py::test_sampled_logprobs_are_the_models_own",)),
    Mutation("GPT-2's fused c_attn split in the wrong order", "llmnb/hf_bridge.py", 'zip("qkv", theirs[f"{h}.weight"]', 'zip("kqv", theirs[f"{h}.weight"]',
             ("tests/test_model.py::test_gpt2_matches_a_model_transformers_built_itself_where_gelu_variants_differ",)),
    Mutation("the loss read back from the device every step", "llmnb/train.py", "if done % config.log_interval == 0 or finishing:", "if True:",
             (T + "test_values_are_read_back_from_the_device_only_at_the_logging_interval",)),
    Mutation("a finished run trained again", "llmnb/train.py", 'state["step"] >= config.max_steps', "False",
             (T + "test_a_finished_run_says_so_instead_of_training_again",)),
    Mutation("FSDP checkpoints without optimizer state", "llmnb/train.py",
             'set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],',
             'set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict={"state": {}, "param_groups": optimizer.state_dict()["param_groups"]},',
             (T + "test_two_processes_match_one_process_with_the_same_global_batch",)),
    Mutation("BPE merges the least frequent pair", "llmnb/tokenizer.py", "heapq.heappush(heap, (-pair_counts[p], p))", "heapq.heappush(heap, (pair_counts[p], p))",
             ("tests/test_tokenizer.py",)),
    Mutation("LoRA update scaled by alpha instead of alpha / r", "llmnb/lora.py", "self.scaling = base, r, alpha, alpha / r", "self.scaling = base, r, alpha, alpha",
             ("tests/test_lora.py",)),
    Mutation("LoRA's B initialised at random: the adapted model no longer starts as its base", "llmnb/lora.py",
             "self.lora_B = nn.Parameter(torch.zeros(base.out_features, r", "self.lora_B = nn.Parameter(torch.randn(base.out_features, r",
             ("tests/test_lora.py::test_an_adapted_model_starts_equal_to_its_base_and_merging_changes_nothing_but_speed",)),
    Mutation("SFT loss averaged per rank, not per learned token of the global batch", "llmnb/train.py",
             "weights = counts * world_size() / total.clamp(min=1)", "weights = torch.ones_like(counts) / len(counts)",
             ("tests/test_sft.py::test_two_processes_train_the_same_adapter_as_one_process_on_the_same_global_batch",)),
    Mutation("the chat prompt learned with the reply", "llmnb/sft.py", "return prompt, full[len(prompt):]", "return prompt, full",
             ("tests/test_sft.py::test_rendering_keeps_the_chat_template_and_the_reply_ends_with_the_end_of_turn",)),
    Mutation("held-out problems drawn from the training stream", "llmnb/sft.py", "arithmetic_examples(2 * n_test, seed + n_train)",
             "arithmetic_examples(2 * n_test, seed + 1)",
             ("tests/test_sft.py::test_arithmetic_problems_are_reproducible_their_answers_right_and_held_out_ones_unseen",)),
    Mutation("a LoRA checkpoint resumed without its adapters", "llmnb/train.py",
             'model.load_state_dict(state["model"], strict=not state.get("trainable_only"))', "pass",
             (T + "test_a_lora_run_checkpoints_only_its_adapters_and_resumes_on_the_same_curve",)),
    Mutation("matmul FLOPs counted once per multiply-add", "llmnb/hardware.py", "best = max(best, 2 * size**3 * runs / elapsed)", "best = max(best, size**3 * runs / elapsed)",
             ("tests/test_hardware.py",)),
    Mutation("PPO: the clipped surrogate's min and max swapped", "llmnb/align.py", "masked_mean(torch.maximum(unclipped, clipped), mask)",
             "masked_mean(torch.minimum(unclipped, clipped), mask)", (A + "test_the_clipped_policy_loss_stops_paying_outside_the_clip_range",)),
    Mutation("PPO: GAE without the discount on the next value", "llmnb/align.py", "delta = rewards[:, t] + gamma * next_value - values[:, t]",
             "delta = rewards[:, t] + next_value - values[:, t]", (A + "test_gae_is_the_discounted_sum_of_td_errors_and_returns_are_advantages_plus_values",)),
    Mutation("PPO: advantages whitened over padding too", "llmnb/align.py", "    mean = masked_mean(x, mask)\n    var = masked_mean((x - mean) ** 2, mask)",
             "    mean = x.mean()\n    var = ((x - mean) ** 2).mean()", (A + "test_whitening_gives_zero_mean_and_unit_variance_over_real_tokens_only",)),
    Mutation("PPO: the score on the first token, not the last", "llmnb/align.py", "rewards[torch.arange(len(scores)), last] += scores",
             "rewards[:, 0] += scores", (A + "test_kl_penalised_rewards_put_the_score_on_the_last_real_token",)),
    Mutation("PPO: a converged policy whitens pure noise", "llmnb/align.py", "if config.kl_coef == 0 and bool((scores == scores[0]).all()):",
             "if False:", (A + "test_ppo_finds_the_known_optimum_of_a_two_token_bandit_and_stays_there",)),
    Mutation("PPO: the advantage's sign flipped", "llmnb/align.py", "unclipped = -advantages * ratio", "unclipped = advantages * ratio",
             (A + "test_ppo_finds_the_known_optimum_of_a_two_token_bandit_and_stays_there",)),
    Mutation("DPO: the reference log-ratio left out", "llmnb/align.py", "chosen_reward = beta * (policy_chosen - ref_chosen)",
             "chosen_reward = beta * policy_chosen", (A + "test_the_dpo_loss_equals_trl_dpo_trainer_on_the_same_batch_and_reference_logprobs",)),
    Mutation("DPO: the prompt's tokens counted in the sequence log-probability", "llmnb/align.py",
             "learned = completion[:, 1:].bool()  # position t predicts token t + 1", "learned = mask[:, 1:].bool()",
             (A + "test_the_dpo_loss_equals_trl_dpo_trainer_on_the_same_batch_and_reference_logprobs",)),
    Mutation("reward model: the score read at the last position, padding or not", "llmnb/align.py",
             "last = (positions * attention_mask).argmax(-1)", "last = torch.full_like(attention_mask[:, 0], ids.shape[1] - 1)",
             (A + "test_the_reward_model_loss_equals_trl_reward_trainer_on_the_same_batch",)),
    Mutation("GRPO: advantages not normalised by the group's spread", "llmnb/align.py",
             "return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)).flatten()",
             "return (groups - groups.mean(1, keepdim=True)).flatten()", (A + "test_group_advantages_and_the_grpo_loss_against_direct_computations",)),
    Mutation("RLHF: the reference keeps the adapters on", "llmnb/lora.py", "        if self.merged or not self.enabled:", "        if self.merged:",
             (A + "test_response_logprobs_equal_the_samplers_and_token_logprobs_and_the_reference_is_the_base",)),
    Mutation("rollout: the stop token itself masked out", "llmnb/align.py", "keep = (stops.cumsum(-1) - stops == 0).long()",
             "keep = (stops.cumsum(-1) == 0).long()", (A + "test_a_stop_token_ends_the_response_mask_after_it",)),
    Mutation("alignment: the choice made on the test split", "llmnb/align.py", "chosen = max(names, key=lambda n: (val[n], -names.index(n)))",
             "chosen = max(names, key=lambda n: (sum(test_right[n]) / len(test_right[n]), -names.index(n)))",
             (A + "test_validation_checkpoints_keep_the_best_state_and_judge_chooses_on_validation_never_test",)),
    Mutation("alignment: the last checkpoint kept, not the best", "llmnb/align.py", "        load_adapter_state(self.policy, self.best_state)\n", "",
             (A + "test_validation_checkpoints_keep_the_best_state_and_judge_chooses_on_validation_never_test",)),
    Mutation("alignment: a split overlaps notebook 04's problems", "llmnb/align.py", "pool, seen = [], {e.source for e in trained_on}",
             "pool, seen = [], set()", (A + "test_splits_share_no_problem_with_each_other_or_with_what_was_trained_on",)),
    Mutation("rollout: a group's replies continue the wrong prompt", "llmnb/align.py", "last = last.repeat_interleave(g, dim=0)  # (B, 1, C)",
             "last = last.repeat(g, 1, 1)", (A + "test_a_group_shares_its_prompt_and_scores_as_separate_rows_do_with_gradients",)),
    Mutation("generation: the shared system message keeps the rows' padding in front", "llmnb/generate.py",
             "source = torch.where(columns < first[:, None], columns, columns + shared)", "source = columns + shared",
             ("tests/test_generate.py::test_prompts_sharing_a_system_message_read_it_once_with_the_same_result",)),
    Mutation("KL: the sampled log-ratio reported (it can be negative)", "llmnb/align.py", "    return (torch.exp(d) - d - 1).sum(-1)",
             "    return -d.sum(-1)", (A + "test_reported_kl_is_never_negative_and_zero_for_the_reference",)),
    Mutation("DPO: the chosen replies' loss summed, not averaged per token", "llmnb/align.py", "return -chosen.sum() / completion[:, 1:].sum()",
             "return -chosen.mean()", (A + "test_dpo_with_the_chosen_replies_loss_equals_trl_sigmoid_plus_sft",)),
    Mutation("NF4: the quantile offset of the paper left out", "llmnb/quantize.py", "offset = 0.5 * (1 / 32 + 1 / 30)", "offset = 1 / 32",
             (Q + "test_nf4_levels_built_from_normal_quantiles_equal_bitsandbytes_table",)),
    Mutation("NF4: nibbles packed low first", "llmnb/quantize.py", "return (pairs[:, 0] << 4) | pairs[:, 1]", "return (pairs[:, 1] << 4) | pairs[:, 0]",
             (Q + "test_nf4_codes_block_scales_and_packed_bytes_equal_bitsandbytes_on_the_same_blocks",)),
    Mutation("int4 kernel: the zero point without its 8 levels", "llmnb/quantize.py", "zero = lo + 8 * scale", "zero = lo",
             (Q + "test_each_layer_computes_with_the_weight_it_stores",)),
    Mutation("int8: rounded with the fp32 scale, stored in bf16", "llmnb/quantize.py", "scale = scale.to(scale_dtype).float()", "pass",
             (Q + "test_int8_weights_equal_torchao_int8_weight_only_within_one_step",)),
    Mutation("GGUF: queries not permuted for llama.cpp's rotary layout", "llmnb/gguf.py", "t = _permute(t, c.n_head)", "t = t",
             (G + "test_transformers_reads_our_files_back_with_the_logits_of_the_weights_they_store",)),
    Mutation("GGUF: keys permuted by the query head count", "llmnb/gguf.py", "_permute(t, c.n_kv_head)", "_permute(t, c.n_head)",
             (G + "test_transformers_reads_our_files_back_with_the_logits_of_the_weights_they_store",)),
    Mutation("GGUF: special tokens typed as normal text", "llmnb/gguf.py",
             '"types": [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]',
             '"types": [gguf.TokenType.NORMAL for i in range(len(tokens))]', (G + "test_the_vocabulary_we_write_for_smollm2_equals_the_one_llama_cpps_converter_wrote",)),
    Mutation("an artifact another preset wrote taken for this preset's", "llmnb/artifacts.py", 'record.get("preset") != resolve_preset(preset)', "False",
             ("tests/test_artifacts.py::test_a_folder_is_taken_only_with_its_kind_names_preset_settings_and_parent",)),
    Mutation("an artifact made from a since-rebuilt parent taken as current", "llmnb/artifacts.py",
             'return up is not None and up.get("id") == parent["id"] and _current(up)', "return up is not None and _current(up)",
             ("tests/test_artifacts.py::test_a_folder_is_taken_only_with_its_kind_names_preset_settings_and_parent",)),
    Mutation("prompts for generation padded on the right", "llmnb/data.py",
             "ids = pad_sequence(tensors, batch_first=True, padding_value=pad, padding_side=side)",
             'ids = pad_sequence(tensors, batch_first=True, padding_value=pad, padding_side="right")',
             ("tests/test_data.py::test_rows_are_padded_on_the_side_asked_with_a_mask_of_the_real_tokens",)),
    Mutation("every cache row attends to the longest row's positions", "llmnb/serve/step.py",
             "return (columns[None, :] <= positions[:, None])[:, None, None, :]",
             "return torch.ones(len(positions), 1, 1, length, dtype=torch.bool)", (S + "test_requests_joining_and_leaving_get_what_they_would_alone",)),
    Mutation("compiled server step: one row handed unpadded to the library exported for two rows or more", "llmnb/serve/step.py",
             "    MIN_ROWS = 2", "    MIN_ROWS = 1", ("tests/test_serve_step.py::test_a_compiled_step_serves_what_the_eager_one_does",
              "tests/test_serve_step.py::test_one_row_is_served_the_way_that_timed_fastest")),
    Mutation("compiled server step: one row served the way that timed slowest", "llmnb/serve/step.py",
             "json.dumps({\"way\": min(ms, key=ms.get)", "json.dumps({\"way\": max(ms, key=ms.get)",
             ("tests/test_serve_step.py::test_one_row_is_timed_each_way_in_a_child_and_recorded",)),
    Mutation("compiled server step: the plain library of many handed over before the way is chosen", "llmnb/serve/step.py",
             "            self.way = self.way or self._choose()",
             '            self.runner = self._load("many")\n            self.way = self.way or self._choose()',
             ("tests/test_serve_step.py::test_no_library_serves_before_the_way_is_chosen",)),
    Mutation("compiled server step: packed weights chosen, the model's plain ones kept (a packed library on a copy)",
             "llmnb/serve/step.py", "                    swap_module(self.step.model, name, module)", "                    pass",
             ("tests/test_serve_step.py::test_one_row_is_served_the_way_that_timed_fastest",)),
    Mutation("compiled server step: the recorded way ignored, timed at every start", "llmnb/serve/step.py",
             "self.recorded = recorded is not None and recorded[0] in self.ways", "self.recorded = False",
             ("tests/test_serve_step.py::test_one_row_is_timed_each_way_in_a_child_and_recorded",
              "tests/test_serve_step.py::test_a_recorded_way_is_read_before_the_first_product")),
    Mutation("compiled server: oneDNN's cache sized for packed weights when the recorded way is plain", "llmnb/serve/step.py",
             'return recorded is None or recorded[0] == "packed"', "return True",
             ("tests/test_serve_step.py::test_a_recorded_way_is_read_before_the_first_product",)),
    Mutation("compiled server step: the padding row writes into a running row", "llmnb/serve/step.py",
             "tokens, positions = F.pad(tokens, (0, 0, 0, pad)), F.pad(positions, (0, pad))",
             "tokens, positions = F.pad(tokens, (0, 0, pad, 0)), F.pad(positions, (pad, 0))",
             ("tests/test_serve_step.py::test_a_compiled_step_serves_what_the_eager_one_does",
              "tests/test_serve_step.py::test_one_row_is_served_the_way_that_timed_fastest")),
    Mutation("compiled server step: the library copies the weights it is handed (a second copy in memory)", "llmnb/serve/step.py",
             "False, True, user_managed=True)", "False, True, user_managed=False)",
             ("tests/test_serve_step.py::test_the_library_reads_the_models_own_tensors_no_copy",)),
    Mutation("request bodies decoded leniently (a string taken for a number)", "llmnb/serve/schemas.py",
             "msgspec.json.Decoder(schema) for schema", "msgspec.json.Decoder(schema, strict=False) for schema",
             ("tests/test_serve_schemas.py::test_each_refusal_names_its_field",)),
    Mutation("an unknown request field ignored, not refused", "llmnb/serve/schemas.py",
             "class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):", "class _Body(msgspec.Struct, kw_only=True):",
             ("tests/test_serve_schemas.py::test_unknown_fields_are_refused_by_name_at_any_depth",)),
    Mutation("a finished request's row not handed to the last one", "llmnb/serve/scheduler.py", "            self.cache.move(last, row)", "            pass",
             (S + "test_requests_joining_and_leaving_get_what_they_would_alone",)),
    Mutation("prefill reads the padding's logits", "llmnb/serve/scheduler.py", "last = torch.tensor([len(seq.prompt) - 1 for seq in seqs], device=device)",
             "last = torch.full((len(seqs),), longest - 1, device=device)", (S + "test_requests_joining_and_leaving_get_what_they_would_alone",)),
    Mutation("a stop string's first characters sent before it is recognised", "llmnb/serve/streaming.py", "            for k in range(min(len(stop) - 1, end), 0, -1):",
             "            for k in range(0):", ("tests/test_serve_moderation.py::test_a_stop_string_split_across_tokens_is_never_released",)),
    Mutation("cumulative probabilities summed over the batch, not the vocabulary", "llmnb/generate.py",
             "cdf = logits.softmax(dim=-1).cumsum(dim=-1)", "cdf = logits.softmax(dim=-1).cumsum(dim=0)",
             ("tests/test_generate.py::test_sampling_draws_tokens_at_their_probabilities",)),
    Mutation("the loss of a float64 model taken in float32", "llmnb/model.py", "    return x if x.dtype == torch.float64 else x.float()",
             "    return x.float()", ("tests/test_lora.py::test_a_few_optimizer_steps_leave_the_same_weights_as_peft",)),
    Mutation("bitsandbytes' reference layers left in training mode (never its packed path)", "llmnb/quantize.py",
             "    return out.eval()  # the new layers too", "    return out  # the new layers too",
             (Q + "test_bitsandbytes_nf4_layers_compute_their_own_dequantized_weight_on_each_cpu_path",)),
    Mutation("a smoke run writes where the cpu preset's models are", "llmnb/paths.py",
             'return root / SMOKE if os.environ.get("LLMNB_PRESET") == SMOKE else root', "return root",
             ("tests/test_paths.py::test_the_smoke_preset_writes_apart_from_the_other_presets_but_shares_the_assets",)),
    Mutation("SentencePiece trained without byte fallback", "llmnb/tokenizer.py", "byte_fallback=byte_fallback, minloglevel=2",
             "byte_fallback=False, minloglevel=2", ("tests/test_tokenizer.py::test_sentencepiece_round_trips_text_it_never_saw_through_byte_pieces",)),
    Mutation("ZeRO-2 lets the weights go after forward (that is ZeRO-3)", "llmnb/parallel.py", 'keep_gathered = strategy == "shard-grad-op"',
             "keep_gathered = False", ("tests/test_parallel.py::test_sharding_strategies_train_alike_and_hold_less_per_process_the_more_they_shard",)),
    Mutation("magnitude pruning removes the largest weights", "llmnb/prune.py", "            drop = flat < threshold",
             "            drop = flat > flat.kthvalue(flat.numel() - k).values",
             (P + "test_magnitude_masks_equal_torch_prune_and_remove_exactly_that_share",)),
    Mutation("Wanda without the activation norm (magnitude per row)", "llmnb/prune.py",
             'scores = weight.detach().abs().float() if method == "magnitude" else wanda_scores(weight, norm)',
             "scores = weight.detach().abs().float()", (P + "test_wanda_masks_equal_a_direct_computation_block_after_pruned_block",)),
    Mutation("structured pruning: a head removed from q but not from o", "llmnb/prune.py",
             '            _take(state, p + "attn.o_proj", rows, 1)\n', "",
             (P + "test_structured_pruning_equals_the_dense_model_with_those_units_switched_off",)),
    Mutation("structured pruning: the highest-scoring neurons removed", "llmnb/prune.py", "keep = neuron.topk(d_ff).indices.sort().values",
             "keep = neuron.topk(d_ff, largest=False).indices.sort().values", (P + "test_structured_pruning_removes_the_lowest_scoring_neurons",)),
    Mutation("GGUF: a pruned model's head size left out of the file", "llmnb/gguf.py", "        if c.attn_dim != c.n_embd:  # heads pruned",
             "        if False:  # heads pruned", (G + "test_llama_cpp_runs_a_model_whose_heads_were_pruned",)),
    Mutation("ONNX export: the past keys not joined to the new ones", "llmnb/onnx_runtime.py",
             "k = torch.cat([self.past_keys[layer], k], dim=2)  # (B, n_kv, past + T, hs)", "pass",
             ("tests/test_onnx_runtime.py::test_decoding_through_the_exported_cache_continues_as_we_do",)),
    Mutation("tensor parallel attention: keys and values of the wrong heads", "llmnb/parallel.py",
             "kv_rows = slice(tp_rank * kv_heads * c.head_dim, (tp_rank + 1) * kv_heads * c.head_dim)",
             "kv_rows = slice((1 - tp_rank) * kv_heads * c.head_dim, (2 - tp_rank) * kv_heads * c.head_dim)",
             ("tests/test_parallel.py::test_tensor_parallel_mlp_and_attention_equal_one_process_after_one_all_reduce",)),
    Mutation("lm-eval under our GPT: the log-likelihood read one position late", "llmnb/report_card.py",
             "positions = slice(len(r) - 1 - n, len(r) - 1)", "positions = slice(len(r) - n, len(r))",
             ("tests/test_report_card.py::test_our_gpt_under_the_harness_scores_as_its_hf_model_type",)),
    Mutation("lm-eval under our GPT: a text's first token predicted from end-of-text, not BOS", "llmnb/report_card.py",
             "return bos if bos is not None else self.eot_token_id", "return self.eot_token_id",
             ("tests/test_report_card.py::test_our_gpt_under_the_harness_scores_as_its_hf_model_type",)),
    Mutation("contamination: short items never checked", "llmnb/evaluation.py", "k = min(n, len(w))\n", "k = n\n",
             ("tests/test_evaluation.py::test_contamination_finds_a_planted_duplicate_and_only_it",)),
    Mutation("echo: prompt log-probabilities shifted by one token", "llmnb/serve/served.py",
             "picked = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()",
             "picked = logprobs.gather(1, torch.tensor(ids[:-1])[:, None])[:, 0].tolist()",
             ("tests/test_serve.py::test_echo_returns_each_prompt_tokens_log_probability_for_a_batch_of_prompts",)),
    Mutation("packed layer drops its bias", "llmnb/decoding.py", "self.packed, self.bias, \"none\"", "self.packed, None, \"none\"",
             ("tests/test_decoding.py::test_packed_weights_compute_what_the_plain_ones_do",)),
    Mutation("tied head packed: the vocabulary matrix stored twice", "llmnb/decoding.py",
             "if type(module) is nn.Linear and module.weight is not head:", "if type(module) is nn.Linear:",
             ("tests/test_decoding.py::test_a_tied_head_stays_tied_and_no_matrix_is_stored_twice",)),
    Mutation("compiled step: a padded row's position counts its padding", "llmnb/decoding.py",
             "positions = attention_mask.sum(1, keepdim=True) - 1", "positions = torch.full((b, 1), past, device=tokens.device)",
             ("tests/test_decoding.py::test_a_compiled_step_decodes_what_the_eager_model_does",)),
    Mutation("bf16 chosen whatever oneDNN is capped to", "llmnb/hardware.py", "if native and not capped:", "if native:",
             ("tests/test_decoding.py::test_bf16_only_where_the_processor_has_it",)),
]


def run(mutation: Mutation) -> tuple[bool, str]:
    """(caught, the last lines of pytest's output) for one mutation, in a fresh copy of the repository."""
    with tempfile.TemporaryDirectory(prefix="llmnb-mutant-") as tmp:
        copy = Path(tmp)
        for part in ("llmnb", "tests", "pyproject.toml", "notebooks"):
            src = ROOT / part
            (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / part)
        target = copy / mutation.file
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return False, f"the line to break is not in {mutation.file} exactly once: update this mutation"
        target.write_text(text.replace(mutation.old, mutation.new))
        env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1", "LLMNB_PRESET": "smoke", "LLMNB_HOME": str(ROOT)}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", *mutation.tests],
                                cwd=copy, env=env, capture_output=True, text=True)
        return result.returncode not in (0, 5), result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutations whose name contains this text")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.only.lower() in m.name.lower()]
    missed = 0
    print("| mutation | caught | pytest says |\n|---|---|---|")
    for mutation in chosen:
        caught, said = run(mutation)
        missed += not caught
        print(f"| {mutation.name} | {'yes' if caught else '**MISSED**'} | {said} |", flush=True)
    print(f"\n{len(chosen) - missed} of {len(chosen)} wrong versions caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
