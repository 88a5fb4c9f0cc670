import copy
import math

import numpy as np
import pytest
import torch

from llmnb import align, lora
from llmnb.model import GPT, GPTConfig, token_logprobs
from llmnb.sft import ARITHMETIC_SYSTEM, Example


def adapted(model: GPT, seed: int = 0) -> GPT:
    """A copy with LoRA adapters whose B is random, so the adapted model differs from its base."""
    policy = copy.deepcopy(model)
    torch.manual_seed(seed)
    lora.attach(policy, "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for layer in lora.adapters(policy).values():
            layer.lora_B.normal_(std=0.5)
    return policy


PREFS = [align.Preference("What is 2 + 3?", "5", "6", ARITHMETIC_SYSTEM), align.Preference("Compute 7 - 4.", "3", "The answer is 11", ARITHMETIC_SYSTEM),
         align.Preference("What is 9 + 9?", "18", "81", ARITHMETIC_SYSTEM)]


def test_a_pair_with_the_same_reply_on_both_sides_is_refused():
    with pytest.raises(ValueError, match="same"):
        align.Preference("What is 1 + 1?", "2", " 2 ")
    plain = ["2", "forsooth, two"]
    kept = align.style_preferences([Example("q1", "2"), Example("q2", "Two, my lord")], plain)
    assert [p.rejected for p in kept] == ["forsooth, two"]


def test_a_preference_batch_is_chosen_rows_then_rejected_rows_with_only_the_reply_in_the_completion_mask(chat_tokenizer):
    ids, mask, completion = align.preference_batch(chat_tokenizer, PREFS, chat_tokenizer.pad_token_id)
    assert ids.shape[0] == 2 * len(PREFS)
    for row, reply in enumerate([p.chosen for p in PREFS] + [p.rejected for p in PREFS]):
        text = chat_tokenizer.decode(ids[row][completion[row].bool()])
        assert text.startswith(reply) and text.rstrip().endswith("<|im_end|>")
        assert mask[row].sum() > completion[row].sum() and not (completion[row].bool() & ~mask[row].bool()).any()


def _trainer_batch(trainer, n):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _conversation_rows(prefs):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "system", "content": p.system}, {"role": "user", "content": p.prompt}],
                               "chosen": [{"role": "assistant", "content": p.chosen}],
                               "rejected": [{"role": "assistant", "content": p.rejected}]} for p in prefs])


def test_the_reward_model_loss_equals_trl_reward_trainer_on_the_same_batch(tiny_base, chat_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    folder, ours = tiny_base
    theirs = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    theirs.config.pad_token_id = chat_tokenizer.pad_token_id
    with torch.no_grad():
        theirs.score.weight.normal_(std=3.0)  # large enough that the rewards of the pairs differ
    trainer = RewardTrainer(model=theirs, args=RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=3),
                            train_dataset=_conversation_rows(PREFS), processing_class=chat_tokenizer)
    inputs = _trainer_batch(trainer, len(PREFS))
    trl_loss = trainer.compute_loss(trainer.model, dict(inputs))
    rm = align.RewardModel(copy.deepcopy(ours))
    with torch.no_grad():
        rm.score.weight.copy_(theirs.score.weight)
    our_loss, _ = align.reward_model_loss(rm, inputs["input_ids"], inputs["attention_mask"])
    assert abs(our_loss.item() - trl_loss.item()) < 1e-5
    assert abs(our_loss.item() - math.log(2)) > 1e-3, "a random head should not give the loss of equal rewards"


def test_the_dpo_loss_equals_trl_dpo_trainer_on_the_same_batch_and_reference_logprobs(tiny_base, chat_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    folder, ours = tiny_base
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder), processing_class=chat_tokenizer,
                         args=DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, beta=0.3, precompute_ref_log_probs=True,
                                        per_device_train_batch_size=3),
                         train_dataset=_conversation_rows(PREFS))
    inputs = _trainer_batch(trainer, len(PREFS))
    generator = torch.Generator().manual_seed(0)
    ref_chosen, ref_rejected = torch.randn(3, generator=generator) - 20, torch.randn(3, generator=generator) - 20
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_chosen, ref_rejected
    trl_loss = trainer._compute_loss(trainer.model, dict(inputs), return_outputs=False)
    trl_loss = trl_loss[0] if isinstance(trl_loss, tuple) else trl_loss
    chosen, rejected = align.sequence_logprobs(ours, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]).chunk(2)
    our_loss, _, _ = align.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3)
    assert abs(our_loss.item() - trl_loss.item()) < 1e-5
    # each reply's log-probability on its own (the prompt cancels in the loss, not in the implicit rewards)
    with torch.no_grad():
        logits = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.log_softmax(-1)
    picked = logits[:, :-1].gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    direct = (picked * inputs["completion_mask"][:, 1:]).sum(-1)
    assert torch.allclose(torch.cat([chosen, rejected]).detach(), direct, atol=1e-4)


def test_dpo_loss_is_log2_at_the_reference_and_falls_as_the_chosen_reply_gains():
    same = torch.tensor([-5.0, -7.0])
    loss, chosen, rejected = align.dpo_loss(same, same - 1, same, same - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and torch.equal(chosen, rejected * 0 + chosen)
    better, _, _ = align.dpo_loss(same + 2, same - 1, same, same - 1, beta=0.1)
    assert better.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), rel=1e-6)


def test_response_logprobs_equal_the_samplers_and_token_logprobs_and_the_reference_is_the_base(tiny_base, chat_tokenizer):
    _, base = tiny_base
    policy = adapted(base)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    rollout = align.sample_rollout(policy, prompts, 6, chat_tokenizer.pad_token_id, stop_token=None, seed=0)
    ours, _ = align.response_logprobs(policy, rollout)
    assert torch.allclose(ours, rollout.logprobs, atol=1e-4), "the sampler's log-probabilities are the policy's"
    direct = token_logprobs(policy, rollout.ids, rollout.mask)[:, rollout.prompt_width - 1:]
    assert torch.allclose(ours, direct, atol=1e-5)
    with torch.no_grad():
        base_logprobs, _ = align.response_logprobs(base, rollout)
    assert torch.allclose(align.reference_logprobs(policy, rollout), base_logprobs, atol=1e-5)
    assert not torch.allclose(ours, base_logprobs, atol=1e-2), "the adapters must change the log-probabilities"


def test_a_stop_token_ends_the_response_mask_after_it():
    model = GPT(GPTConfig.llama(vocab_size=6, block_size=16, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[5] = 0  # all equal logits: uniform sampling; stop token 5 appears somewhere
    rollout = align.sample_rollout(model, [[1, 2]] * 32, 8, pad_id=0, stop_token=5, seed=0)
    for row, mask in zip(rollout.response, rollout.response_mask):
        tokens = row.tolist()
        end = tokens.index(5) + 1 if 5 in tokens else len(tokens)
        assert mask.tolist() == [1.0] * end + [0.0] * (len(tokens) - end)


def direct_advantages(rewards, values, mask, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, written as the sum it is, row by row."""
    out = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        v = list(values[b, :n]) + [0.0]
        deltas = [rewards[b, t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            out[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return out


def test_gae_is_the_discounted_sum_of_td_errors_and_returns_are_advantages_plus_values():
    generator = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 7, generator=generator), torch.randn(4, 7, generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2, [1] + [0] * 6]).float()
    rewards = rewards * mask
    advantages, returns = align.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = direct_advantages(rewards.numpy(), values.numpy(), mask.numpy(), 0.9, 0.8)
    np.testing.assert_allclose(advantages.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(returns.numpy(), (expected + values.numpy()) * mask.numpy(), atol=1e-5)
    mc, _ = align.gae(rewards, torch.zeros_like(values), mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(mc[:, 0].numpy(), rewards.sum(-1).numpy(), atol=1e-5)  # lam = 1, V = 0: the return-to-go


def test_whitening_gives_zero_mean_and_unit_variance_over_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -100.0, -100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    out = align.whiten(x, mask)
    real = out[mask.bool()].numpy()
    assert real.mean() == pytest.approx(0, abs=1e-6) and real.var() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(real, (np.array([1, 2, 3, 4, 5]) - 3) / np.sqrt(2), atol=1e-5)
    assert out[~mask.bool()].abs().sum() == 0


def test_the_clipped_policy_loss_stops_paying_outside_the_clip_range():
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]])).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, clipped = align.policy_loss(logprobs, old, advantages, torch.ones(1, 4), clip=0.2)
    # per token: A>0 ratio 1.5 -> -1.2 (clipped); A>0 ratio 0.5 -> -0.5; A<0 ratio 1.1 -> 1.1; A<0 ratio 0.5 -> 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert clipped.item() == pytest.approx(0.5)
    loss.backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 3] == 0 and logprobs.grad[0, 1] != 0


def test_the_clipped_value_loss_takes_the_worse_of_the_clipped_and_unclipped_errors():
    values, old, returns = torch.tensor([[2.0, 0.1]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss = align.value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    expected = 0.5 * (max(2.0 ** 2, 0.2 ** 2) + max(0.9 ** 2, 0.9 ** 2)) / 2
    assert loss.item() == pytest.approx(expected)


def test_kl_penalised_rewards_put_the_score_on_the_last_real_token():
    logprobs, ref = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]), torch.tensor([[-1.5, -2.0, -1.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).float()
    rewards, kl = align.kl_penalized_rewards(torch.tensor([1.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    np.testing.assert_allclose(kl.numpy(), [[0.5, 0.0, -2.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(rewards.numpy(), [[-0.05, 0.0, 0.2 + 1.0], [-0.1 - 1.0, 0.0, 0.0]], atol=1e-6)


def test_group_advantages_and_the_grpo_loss_against_direct_computations():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    advantages = align.group_advantages(rewards, 4)
    first = np.array([1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(advantages[:4].numpy(), (first - first.mean()) / (first.std(ddof=1) + 1e-4), atol=1e-6)
    assert advantages[4:].abs().sum() == 0, "a group where every answer scores the same teaches nothing"
    with pytest.raises(ValueError, match="groups of 3"):
        align.group_advantages(rewards, 3)
    logprobs, old, ref = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]]), torch.tensor([[-1.2, -2.0], [-0.5, -9.0]]), torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    ratio = np.exp([[0.2, 0.0], [0.0, 0.0]])
    per_token = -np.minimum(ratio * adv.numpy()[:, None], np.clip(ratio, 0.8, 1.2) * adv.numpy()[:, None])
    k3 = np.exp(ref.numpy() - logprobs.numpy()) - (ref.numpy() - logprobs.numpy()) - 1
    expected = ((per_token + 0.04 * k3) * mask.numpy()).sum() / 3
    assert align.grpo_loss(logprobs, old, adv, mask, 0.2, beta=0.04, ref_logprobs=ref).item() == pytest.approx(expected, rel=1e-6)


BEST = [3, 5]  # the bandit's one rewarded reply


def bandit_policy() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.llama(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=16))


def bandit_scores(rollout):
    return (rollout.response == torch.tensor(BEST)).all(-1).float()


def test_ppo_finds_the_known_optimum_of_a_two_token_bandit_and_stays_there():
    """One rewarded reply out of 64: PPO (no KL, so the optimum is that reply with probability 1) must find it and keep it."""
    policy, head = bandit_policy(), torch.nn.Linear(16, 1)
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(head.parameters()), lr=1e-2)
    config = align.RLConfig(kl_coef=0.0, epochs=2, minibatches=2, lam=1.0)
    rewards = []
    for step in range(40):
        rollout = align.sample_rollout(policy, [[1]] * 32, 2, pad_id=0, stop_token=None, seed=step)
        scores = bandit_scores(rollout)
        align.ppo_update(policy, head, optimizer, rollout, scores, rollout.logprobs, config)
        rewards.append(scores.mean().item())
    greedy = policy.eval()(torch.tensor([[1]]))[0][0, -1].argmax().item()
    assert rewards[0] < 0.1 and min(rewards[-10:]) > 0.8 and greedy == BEST[0]


def test_grpo_finds_the_known_optimum_of_a_two_token_bandit():
    policy = bandit_policy()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    config = align.RLConfig(kl_coef=0.0, epochs=2, samples_per_prompt=16)
    rewards = []
    for step in range(60):
        rollout = align.sample_rollout(policy, [[1]] * 64, 2, pad_id=0, stop_token=None, seed=step)
        scores = bandit_scores(rollout)
        align.grpo_update(policy, optimizer, rollout, scores, None, config)
        rewards.append(scores.mean().item())
    assert rewards[0] < 0.1 and np.mean(rewards[-5:]) > 0.9


def test_a_reward_of_the_wrong_shape_or_nan_stops_the_run_naming_the_batch(tiny_base, chat_tokenizer):
    rollout = align.Rollout(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), 1, torch.zeros(2, 2))
    examples = [Example("q", "1", "1"), Example("q", "2", "2")]
    with pytest.raises(ValueError, match=r"batch 7.*shape \(2,\)"):
        align.checked_scores(lambda e, r, ro: torch.zeros(2, 1), examples, ["1", "2"], rollout, 7)
    with pytest.raises(ValueError, match="NaN.*batch 3"):
        align.checked_scores(lambda e, r, ro: torch.tensor([0.0, float("nan")]), examples, ["1", "2"], rollout, 3)
    assert align.verifier_reward(examples, ["so 1", "3"], rollout).tolist() == [1.0, 0.0]


def test_kl_past_its_bound_stops_the_run_and_says_what_to_lower(tiny_base, chat_tokenizer):
    _, base = tiny_base
    policy = adapted(base)
    config = align.RLConfig(method="ppo", prompts_per_step=2, max_new_tokens=4, max_kl=-1e9, epochs=1, minibatches=1)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        align.new_state(copy.deepcopy(base), chat_tokenizer, config)
    state = align.new_state(policy, chat_tokenizer, config)
    examples = [Example("What is 1 + 1?", "2", "2", system=ARITHMETIC_SYSTEM)] * 2
    with pytest.raises(RuntimeError, match="lower lr .* or raise kl_coef"):
        align.train_rl(state, examples, align.verifier_reward, config, progress=False)


def test_train_preferences_learns_a_reward_model_that_ranks_the_training_pairs(tiny_base, chat_tokenizer):
    _, base = tiny_base
    rm = align.RewardModel(copy.deepcopy(base))
    history = align.train_preferences(lambda batch: align.rm_batch_loss(rm, chat_tokenizer, batch), list(rm.parameters()), PREFS,
                                      steps=30, batch_size=3, lr=3e-3, progress=False)
    assert history[-1]["loss"] < 0.3 * history[0]["loss"] and history[-1]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="fewer than one batch"):
        align.train_preferences(lambda batch: None, [], PREFS, steps=1, batch_size=4, lr=1e-3)


def test_verifier_pairs_put_a_right_sample_over_a_wrong_one_and_the_answer_key_only_when_asked(monkeypatch):
    examples = [Example("What is 1 + 1?", "2", "2", system=ARITHMETIC_SYSTEM), Example("What is 2 + 2?", "4", "4", system=ARITHMETIC_SYSTEM),
                Example("What is 3 + 3?", "6", "6", system=ARITHMETIC_SYSTEM)]
    replies = ["3", "2", "4", "4", "5", "7"]  # two samples each: right and wrong, all right, all wrong
    monkeypatch.setattr(align, "sample_rollout", lambda *args, **kwargs: None)
    monkeypatch.setattr(align, "decode_responses", lambda tokenizer, rollout: replies)
    monkeypatch.setattr(align, "prompt_ids", lambda tokenizer, prompt, system: [1])
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()
    pairs = align.verifier_preferences(None, tok, examples, samples=2)
    assert [(p.prompt, p.chosen, p.rejected, p.source) for p in pairs] == [("What is 1 + 1?", "2", "3", "sampled")]
    with_key = align.verifier_preferences(None, tok, examples, samples=2, reference_when_none=True)
    assert [(p.chosen, p.rejected, p.source) for p in with_key] == [("2", "3", "sampled"), ("6", "5", "reference")]


def test_a_group_shares_its_prompt_and_scores_as_separate_rows_do_with_gradients(tiny_base, chat_tokenizer):
    """Shared prefill: the same tokens and log-probabilities as separate sampling, and the grouped forward pass (the
    prompt once, its keys shared by the replies) gives the same log-probabilities and gradients as the full rows."""
    _, base = tiny_base
    policy = adapted(base)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    grouped = align.sample_rollout(policy, prompts, 6, chat_tokenizer.pad_token_id, stop_token=None, seed=3, samples=4)
    separate = align.sample_rollout(policy, [p for p in prompts for _ in range(4)], 6, chat_tokenizer.pad_token_id, stop_token=None, seed=3)
    assert grouped.group == 4 and separate.group == 1
    assert torch.equal(grouped.ids, separate.ids) and torch.equal(grouped.mask, separate.mask)
    torch.testing.assert_close(grouped.logprobs, separate.logprobs, atol=1e-5, rtol=0)
    grads = []
    for rollout in (grouped, separate):
        policy.zero_grad(set_to_none=True)
        logprobs, _ = align.response_logprobs(policy, rollout)
        torch.testing.assert_close(logprobs, rollout.logprobs, atol=1e-4, rtol=0)
        (logprobs * torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_reported_kl_is_never_negative_and_zero_for_the_reference(tiny_base, chat_tokenizer):
    _, base = tiny_base
    logprobs, ref = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.4]]))
    d = ref - logprobs
    assert align.reply_kl(logprobs, ref, torch.ones(1, 2)).item() == pytest.approx((d.exp() - d - 1).sum().item())
    assert align.reply_kl(logprobs, ref, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.exp(-math.log(2)) + math.log(2) - 1)
    examples = [Example("What is 2 + 3?", "5", "5", system=ARITHMETIC_SYSTEM), Example("Compute 7 - 4.", "3", "3", system=ARITHMETIC_SYSTEM)]
    start = copy.deepcopy(base)
    lora.attach(start, "all-linear", r=4, alpha=8)  # B = 0: the policy is its reference
    assert align.kl_from_reference(start, chat_tokenizer, examples, 4) == pytest.approx(0.0, abs=1e-6)
    policy = adapted(base)
    kls = [align.kl_from_reference(policy, chat_tokenizer, examples, 4, samples=2, seed=s) for s in range(3)]
    assert all(k > 0 for k in kls)
    # the same quantity summed by hand: sum_t sum_v pi(v) (log pi(v) - log ref(v)) over one sampled rollout
    rollout = align.sample_rollout(policy, [align.prompt_ids(chat_tokenizer, e.prompt, e.system) for e in examples], 4,
                                   chat_tokenizer.pad_token_id, chat_tokenizer.eos_token_id, seed=0, samples=2)
    with torch.no_grad():
        logits = policy(rollout.ids, attention_mask=rollout.mask)[0][:, rollout.prompt_width - 1:-1].double()
        with lora.disabled(policy):
            ref_logits = policy(rollout.ids, attention_mask=rollout.mask)[0][:, rollout.prompt_width - 1:-1].double()
    p, q = logits.softmax(-1), ref_logits.softmax(-1)
    direct = ((p * (p.log() - q.log())).sum(-1) * rollout.response_mask).sum(-1).mean().item()
    assert align.kl_from_reference(policy, chat_tokenizer, examples, 4, samples=2, seed=0) == pytest.approx(direct, rel=1e-4)


def test_dpo_with_the_chosen_replies_loss_equals_trl_sigmoid_plus_sft(tiny_base, chat_tokenizer, tmp_path):
    """RPO: DPO plus w times the chosen replies' mean token loss, as trl's loss_type=["sigmoid", "sft"], loss_weights=[1, w]."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    folder, ours = tiny_base
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder), processing_class=chat_tokenizer,
                         args=DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, beta=0.3, precompute_ref_log_probs=True,
                                        per_device_train_batch_size=3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7]),
                         train_dataset=_conversation_rows(PREFS))
    inputs = _trainer_batch(trainer, len(PREFS))
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = torch.full((3,), -20.0), torch.full((3,), -21.0)
    trl_loss = trainer._compute_loss(trainer.model, dict(inputs), return_outputs=False)
    trl_loss = trl_loss[0] if isinstance(trl_loss, tuple) else trl_loss
    chosen, rejected = align.sequence_logprobs(ours, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]).chunk(2)
    dpo, _, _ = align.dpo_loss(chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], beta=0.3)
    ours_loss = dpo + 0.7 * align.chosen_nll(chosen, inputs["completion_mask"][:3])
    assert abs(ours_loss.item() - trl_loss.item()) < 1e-5
    assert abs(dpo.item() - trl_loss.item()) > 1e-2, "the sft term must matter on this batch"


def test_splits_share_no_problem_with_each_other_or_with_what_was_trained_on():
    trained_on = align.arithmetic_examples(50, seed=1)
    splits = align.arithmetic_splits(trained_on, 30, 20, 40, seed=51)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 20, 40)
    sets = [{e.source for e in part} for part in (trained_on, splits.train, splits.val, splits.test)]
    assert all(len(s) == n for s, n in zip(sets[1:], (30, 20, 40))), "no repeats inside a split"
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    overlapping = align.arithmetic_examples(20, seed=51)  # the stream the splits start from: all of it is excluded
    assert not {e.source for e in align.arithmetic_splits(overlapping, 5, 5, 5, seed=51).val} & {e.source for e in overlapping}
    with pytest.raises(ValueError, match="distinct unseen problems"):  # the stream's first 45 problems, 40 of them excluded
        align.arithmetic_splits(align.arithmetic_examples(40, seed=51), 5, 5, 5, seed=51)


def test_validation_checkpoints_keep_the_best_state_and_judge_chooses_on_validation_never_test(tiny_base):
    _, base = tiny_base
    policy = adapted(base)
    layer = next(iter(lora.adapters(policy).values()))
    # the validation score rises, peaks at the second check (after 2 steps), then falls: the peak's adapters must come back
    scores = iter([[True, False, False], [True, True, True], [True, True, False]])
    checkpoints = align.ValidationCheckpoints(policy, lambda m: next(scores), every_seconds=1.0)
    history = []
    for step in range(4):
        with torch.no_grad():
            layer.lora_B.add_(1.0)
        history.append({"elapsed": 0.6 * (step + 1)})
        checkpoints(step, history[-1])  # checks after 1.2 s (step 2) and 2.4 s (step 4)
    peak = layer.lora_B.detach().clone() - 2.0
    best = checkpoints.finish(history)
    assert [r["steps"] for r in checkpoints.records] == [0, 2, 4]
    assert best["steps"] == 2 and best["val accuracy"] == pytest.approx(1.0)
    torch.testing.assert_close(layer.lora_B.detach(), peak, msg="the best checkpoint's adapters are loaded back")
    # the choice: val prefers "b", test would prefer "c"; a tie with the baseline keeps the baseline
    val = {"start": [1, 0, 0, 0], "b": [1, 1, 1, 0], "c": [1, 1, 0, 0]}
    test = {"start": [1, 0, 0, 0, 0], "b": [1, 1, 0, 0, 0], "c": [1, 1, 1, 1, 1]}
    verdict = align.judge(val, test, baseline="start")
    assert verdict.chosen == "b"
    assert verdict.rows["c"]["test accuracy"] == 1.0 and verdict.rows["c"]["change"] == pytest.approx(0.8)
    assert verdict.rows["b"]["McNemar p"] == pytest.approx(1.0)
    assert align.judge({"start": [1, 0], "b": [0, 1]}, {"start": [1], "b": [1]}, baseline="start").chosen == "start"
    with pytest.raises(ValueError, match="validation and test scores"):
        align.judge(val, {"start": [1]}, baseline="start")


def test_validation_time_is_not_the_methods_time(tiny_base, chat_tokenizer):
    import time as clock

    _, base = tiny_base
    policy = adapted(base)
    config = align.RLConfig(method="grpo", steps=3, seconds=None, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=2, epochs=1)
    slow = lambda step, stats: clock.sleep(0.3)  # noqa: E731 (a stand-in validation)
    examples = [Example("What is 2 + 3?", "5", "5", system=ARITHMETIC_SYSTEM), Example("Compute 7 - 4.", "3", "3", system=ARITHMETIC_SYSTEM)]
    history = align.train_rl(align.new_state(policy, chat_tokenizer, config), examples, align.verifier_reward, config, on_step=slow,
                             progress=False)
    assert history[-1]["elapsed"] < 0.3, "the callback's sleep must not count as training time"
