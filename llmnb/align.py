"""Aligning a model with feedback: preference pairs, a reward model, DPO, PPO and GRPO.

    prefs = verifier_preferences(policy, tok, examples, samples=4)   # rejection sampling: correct > wrong
    rm = RewardModel(backbone); bradley_terry_loss(rm(chosen), rm(rejected))
    dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)        # Rafailov et al., 2023
    config = RLConfig(method="ppo")                                            # Ouyang et al., 2022; "grpo": Shao et al., 2024
    history = train_rl(new_state(policy, tok, config), prompts, verifier_reward, config)

The policy is llmnb's GPT with LoRA adapters; its frozen reference is the same model with the
adapters switched off (`lora.disabled`), so RLHF costs one model in memory, not two. A rollout
keeps prompts left-padded to one width and responses after them, so every loss below works on
(batch, response length) tensors with a mask: 1 up to and including the end-of-turn token.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import lora
from .data import pad_rows
from .generate import generate
from .model import GPT, PrefixCache, token_logprobs
from .evaluation import last_number, paired_difference, wilson_interval
from .sft import Example, arithmetic_examples, prompt_ids, render

# --- preference data -------------------------------------------------------------------------


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str
    system: str = ""
    source: str = ""  # where the pair came from ("sampled", "reference", a play)

    def __post_init__(self) -> None:
        if self.chosen.strip() == self.rejected.strip():
            raise ValueError(f"chosen and rejected replies are the same ({self.chosen!r}) for prompt {self.prompt!r}: "
                             "such a pair teaches nothing, drop it")


def verifier_preferences(model: GPT, tokenizer, examples: list[Example], samples: int = 4, max_new_tokens: int = 16,
                         seed: int = 0, reference_when_none: bool = False) -> list[Preference]:
    """Rejection sampling: sample replies, and pair a right one (the verifier says so) with a wrong one, per prompt.

    Prompts whose samples are all right give no pair; where all are wrong, `reference_when_none`
    pairs the reference answer with a wrong sample (the answer key as the preferred reply), else
    the prompt gives none. `source` says which: "sampled" or "reference".
    """
    rollout = sample_rollout(model, [prompt_ids(tokenizer, e.prompt, e.system) for e in examples], max_new_tokens,
                             tokenizer.pad_token_id, tokenizer.eos_token_id, seed, samples)
    replies = decode_responses(tokenizer, rollout)
    out = []
    for i, example in enumerate(examples):
        group = replies[i * samples:(i + 1) * samples]
        right = [r for r in group if last_number(r) == example.answer]
        wrong = [r for r in group if last_number(r) != example.answer and r.strip() and r.strip() != example.response.strip()]
        if wrong and (right or reference_when_none):
            chosen, how = (right[0], "sampled") if right else (example.response, "reference")
            out.append(Preference(example.prompt, chosen, wrong[0], example.system, how))
    return out


def style_preferences(examples: list[Example], plain_replies: list[str]) -> list[Preference]:
    """The in-character reply (the play's own) over the base model's plain one; identical pairs are dropped."""
    return [Preference(e.prompt, e.response, plain, e.system, e.source) for e, plain in zip(examples, plain_replies, strict=True)
            if e.response.strip() != plain.strip()]


def preference_batch(tokenizer, prefs: list[Preference], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, completion mask), each (2B, T), right-padded: the B chosen conversations, then the B rejected."""
    rows = [render(tokenizer, Example(p.prompt, reply, system=p.system)) for reply_of in ("chosen", "rejected") for p in prefs
            for reply in [getattr(p, reply_of)]]
    ids, mask = pad_rows([prompt + response for prompt, response in rows], pad_id)
    completion = torch.zeros_like(ids)
    for i, (prompt, response) in enumerate(rows):
        completion[i, len(prompt):len(prompt) + len(response)] = 1
    return ids, mask, completion


# --- the reward model: a scalar on a transformer ------------------------------------------------


class RewardModel(nn.Module):
    """A backbone's last hidden state at the last real token, through one linear layer: a score per sequence."""

    def __init__(self, backbone: GPT):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.n_embd, 1, bias=False, device=backbone.wte.weight.device)
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(backbone.config.n_embd + 1))  # as transformers' score head

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.hidden_states(ids, attention_mask=attention_mask)  # (B, T, C)
        positions = torch.arange(ids.shape[1], device=ids.device)
        last = (positions * attention_mask).argmax(-1)  # the last real token, with padding on either side
        return self.score(hidden[torch.arange(len(ids)), last]).squeeze(-1).float()  # (B,)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected): the probability that a person prefers the chosen reply."""
    return -F.logsigmoid(chosen - rejected).mean()


def reward_model_loss(rm: RewardModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss on a `preference_batch`, and the share of pairs the model ranks right."""
    chosen, rejected = rm(ids, mask).chunk(2)
    return bradley_terry_loss(chosen, rejected), (chosen > rejected).float().mean()


# --- DPO: the reward model folded into the policy --------------------------------------------------


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """log p(response | prompt) of each row (B,): the response's token log-probabilities summed.

    On llmnb's GPT the output head runs on the response positions only (as `trl` does with its
    fused head): with a 49k vocabulary the head over a whole chat row costs more than the pair's replies.
    """
    learned = completion[:, 1:].bool()  # position t predicts token t + 1
    if not isinstance(model, GPT):
        return (token_logprobs(model, ids, mask) * learned).sum(-1)
    hidden = model.hidden_states(ids, attention_mask=mask)[:, :-1]  # (B, T-1, C)
    logprobs = -F.cross_entropy(model.lm_head(hidden[learned]).float(), ids[:, 1:][learned], reduction="none")  # (N,)
    rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(learned)[learned]
    return torch.zeros(len(ids), device=ids.device).index_add(0, rows, logprobs)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-log sigmoid(beta [(log pi/ref)(chosen) - (log pi/ref)(rejected)]); also the implicit rewards of both replies."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward).mean(), chosen_reward.detach(), rejected_reward.detach()


def chosen_nll(chosen: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """The chosen replies' mean loss per token, from their summed log-probabilities (B,) and completion mask (B, T)."""
    return -chosen.sum() / completion[:, 1:].sum()


def dpo_batch_loss(policy: GPT, tokenizer, prefs: list[Preference], beta: float, sft_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO on one batch; the reference is the policy with its adapters off, computed on the fly as trl does by default.

    `sft_weight` > 0 adds that much of the chosen replies' mean token loss (RPO, Pang et al., 2024; trl's
    loss_type=["sigmoid", "sft"]): DPO alone can lower the chosen reply's likelihood along with the rejected one's,
    and on a task with one right answer that unlearns it.
    """
    ids, mask, completion = (t.to(policy.wte.weight.device) for t in preference_batch(tokenizer, prefs, tokenizer.pad_token_id))
    with torch.no_grad(), lora.disabled(policy):
        ref_chosen, ref_rejected = sequence_logprobs(policy, ids, mask, completion).chunk(2)
    chosen, rejected = sequence_logprobs(policy, ids, mask, completion).chunk(2)
    loss, chosen_reward, rejected_reward = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    if sft_weight:
        loss = loss + sft_weight * chosen_nll(chosen, completion[:len(prefs)])
    return loss, {"accuracy": (chosen_reward > rejected_reward).float().mean().item(), "margin": (chosen_reward - rejected_reward).mean().item(),
                  "chosen log pi/ref": (chosen - ref_chosen).detach().mean().item()}  # below 0: the right reply grew less likely


def rm_batch_loss(rm: RewardModel, tokenizer, prefs: list[Preference]) -> tuple[torch.Tensor, dict[str, float]]:
    ids, mask, _ = (t.to(rm.score.weight.device) for t in preference_batch(tokenizer, prefs, tokenizer.pad_token_id))
    loss, accuracy = reward_model_loss(rm, ids, mask)
    return loss, {"accuracy": accuracy.item()}


def train_preferences(batch_loss: Callable[[list[Preference]], tuple[torch.Tensor, dict[str, float]]], params: list[nn.Parameter],
                      prefs: list[Preference], steps: int, batch_size: int, lr: float, seed: int = 0, seconds: float | None = None,
                      max_grad_norm: float = 1.0, desc: str = "pairs", progress: bool = True,
                      on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """AdamW on `batch_loss` over batches of preference pairs drawn in a seeded order (the reward model's and DPO's loop).

    `on_step` as in `train_rl`: after each step, its time left out of the budget.
    """
    if len(prefs) < batch_size:
        raise ValueError(f"{len(prefs)} preference pairs, fewer than one batch of {batch_size}: sample more pairs or lower batch_size")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng, order, history, started = random.Random(seed), [], [], time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=1)
    for step in bar:
        if seconds is not None and time.perf_counter() - started > seconds:
            _stopped_at_budget(bar, seconds)
            break
        while len(order) < batch_size:
            order += rng.sample(range(len(prefs)), len(prefs))
        batch, order = [prefs[i] for i in order[:batch_size]], order[batch_size:]
        loss, stats = batch_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        history.append({"step": step, "loss": loss.item(), **stats, "elapsed": time.perf_counter() - started})
        if on_step is not None:
            started += _timed_call(on_step, step, history[-1])
    return history


# --- rollouts ----------------------------------------------------------------------------------


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, P + R): prompts left-padded to width P, responses after them
    mask: torch.Tensor  # (B, P + R): 1 = a real token
    prompt_width: int
    logprobs: torch.Tensor  # (B, R): log-probabilities of the sampled tokens under the policy that sampled them
    group: int = 1  # rows i*group ... (i+1)*group - 1 answer one prompt: its forward pass is shared by them

    @property
    def response(self) -> torch.Tensor:
        return self.ids[:, self.prompt_width:]

    @property
    def response_mask(self) -> torch.Tensor:
        return self.mask[:, self.prompt_width:].float()


def sample_rollout(model: GPT, prompts: list[list[int]], max_new_tokens: int, pad_id: int, stop_token: int | None,
                   seed: int, samples: int = 1) -> Rollout:
    """Sample `samples` responses per prompt at temperature 1 (so the sampler is the policy whose ratio PPO takes).

    A prompt is prefilled once for all its samples, and every sample of the batch decodes together.
    """
    device = model.wte.weight.device
    ids, mask = pad_rows(prompts, pad_id, "left")
    ids, mask = ids.to(device), mask.to(device)
    out, logprobs = generate(model, ids, max_new_tokens, temperature=1.0, stop_tokens=None if stop_token is None else [stop_token],
                             attention_mask=mask, seed=seed, return_logprobs=True, samples=samples)
    mask = mask.repeat_interleave(samples, dim=0)
    response = out[:, ids.shape[1]:]
    if stop_token is None:
        keep = torch.ones_like(response)
    else:  # keep up to and including the first stop token: the model learns when to stop
        stops = (response == stop_token).long()
        keep = (stops.cumsum(-1) - stops == 0).long()
    return Rollout(out, torch.cat([mask, keep], dim=1), ids.shape[1], logprobs * keep, samples)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    rows = [r[m.bool()].tolist() for r, m in zip(rollout.response.cpu(), rollout.response_mask.cpu())]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def response_hidden(model: GPT, rollout: Rollout) -> torch.Tensor:
    """Hidden states (B, R, C) at the positions that predict the response tokens (the last prompt token's onward).

    A group's prompt goes through the model once; its keys and values (with their gradients)
    are shared by the group's replies, which continue from them.
    """
    p, g, ids, mask = rollout.prompt_width, rollout.group, rollout.ids, rollout.mask
    if g == 1:
        return model.hidden_states(ids, attention_mask=mask)[:, p - 1:-1]  # position t predicts token t + 1
    prefix = PrefixCache(model.config.n_layer)
    last = model.hidden_states(ids[::g, :p], attention_mask=mask[::g, :p], cache=prefix)[:, -1:]  # (B/g, 1, C)
    last = last.repeat_interleave(g, dim=0)  # (B, 1, C)
    if ids.shape[1] - p == 1:
        return last
    replies = model.hidden_states(ids[:, p:-1], attention_mask=mask[:, :-1], cache=prefix.repeat_interleave(g))  # (B, R-1, C)
    return torch.cat([last, replies], dim=1)


def response_logprobs(model: GPT, rollout: Rollout, value_head: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities (B, R) of the rollout's response tokens under `model`, and the value head's estimates there.

    The output head runs on the response positions only: the prompt is most of the row.
    """
    h = response_hidden(model, rollout)  # (B, R, C)
    logits = model.lm_head(h).float()  # (B, R, vocab)
    logprobs = -F.cross_entropy(logits.flatten(0, 1), rollout.response.flatten(), reduction="none").view_as(rollout.logprobs)
    mask = rollout.response_mask
    values = value_head(h).squeeze(-1).float() * mask if value_head is not None else None
    return logprobs * mask, values


@torch.no_grad()
def reference_logprobs(policy: GPT, rollout: Rollout) -> torch.Tensor:
    """The same tokens under the reference: the policy with its LoRA adapters switched off."""
    with lora.disabled(policy):
        return response_logprobs(policy, rollout)[0]


# --- PPO's pieces, each a direct formula ---------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def reply_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) of each reply (B,) from its sampled tokens alone: Schulman's k3 estimator, exp(d) - d - 1 with
    d = log ref - log pi, summed over the reply. Unbiased like log pi - log ref, but never negative."""
    d = (ref_logprobs - logprobs) * mask
    return (torch.exp(d) - d - 1).sum(-1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean and unit variance over the real tokens (advantage whitening)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, R): -kl_coef (log pi - log ref) at every token, plus the sequence's score at its last token.

    Also the per-token KL estimate itself. The penalty keeps the policy near the reference,
    where the reward model's judgement can still be trusted.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1) - 1).long().clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016): advantages and returns, both (B, R).

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}; after the last real token V = 0.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: the update stops paying once the ratio pi/pi_old leaves [1 - clip, 1 + clip]."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float) -> torch.Tensor:
    """0.5 (V - return)^2, with V kept within `clip` of the value it had at the rollout (the pessimistic of the two)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# --- GRPO: advantages from a group of samples, no value head -----------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(reward - group mean) / (group std + eps): each sample against the other answers to its own prompt."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)).flatten()


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float,
              beta: float = 0.0, ref_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """The clipped surrogate with one advantage per sequence, averaged over every real token of the batch (DAPO's
    normalisation, trl's default); with beta > 0, plus beta times the k3 estimate of KL(pi || ref)."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages[:, None]
    per_token = -torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    if beta:
        log_ref_ratio = ref_logprobs - logprobs
        per_token = per_token + beta * (torch.exp(log_ref_ratio) - log_ref_ratio - 1)
    return masked_mean(per_token, mask)


# --- the loops -----------------------------------------------------------------------------------


RL_METHODS = ("ppo", "grpo")


@dataclass
class RLConfig:
    method: str = "grpo"  # "ppo": a learned value baseline (a value head); "grpo": the group's mean reward as the baseline
    steps: int = 20  # rollouts, each followed by its updates
    seconds: float | None = None  # stop early when this much time is spent (a compute budget shared by methods)
    prompts_per_step: int = 8
    samples_per_prompt: int = 1  # GRPO's group size; PPO usually 1
    max_new_tokens: int = 16
    lr: float = 1e-4
    kl_coef: float = 0.05  # PPO's per-token penalty; GRPO's beta
    max_kl: float = 10.0  # nats per reply: a run past it is stopped, it has left the reference
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    epochs: int = 2  # passes over each rollout (PPO); GRPO's num_iterations
    minibatches: int = 2
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in RL_METHODS:
            raise ValueError(f"unknown RL method {self.method!r}: choose one of {RL_METHODS}")


RewardFn = Callable[[list[Example], list[str], Rollout], torch.Tensor]


def verifier_reward(examples: list[Example], replies: list[str], rollout: Rollout) -> torch.Tensor:
    """1 where the reply's last number is the exact answer, else 0: the score nobody can game."""
    return torch.tensor([float(last_number(r) == e.answer) for e, r in zip(examples, replies, strict=True)])


def learned_reward(rm: RewardModel) -> RewardFn:
    """The reward model's score of the prompt and reply (the same tokens the policy produced)."""
    @torch.no_grad()
    def reward(examples: list[Example], replies: list[str], rollout: Rollout) -> torch.Tensor:
        return rm(rollout.ids, rollout.mask).cpu()
    return reward


def checked_scores(reward_fn: RewardFn, examples: list[Example], replies: list[str], rollout: Rollout, step: int) -> torch.Tensor:
    """The reward function's scores, refused unless they are one finite number per reply."""
    scores = reward_fn(examples, replies, rollout)
    if not isinstance(scores, torch.Tensor) or scores.shape != (len(replies),):
        raise ValueError(f"the reward function returned {getattr(scores, 'shape', type(scores).__name__)} for batch {step}; "
                         f"it must return a tensor of shape ({len(replies)},), one score per reply")
    if not torch.isfinite(scores).all():
        raise ValueError(f"the reward function returned NaN or infinity for batch {step} (replies {[r for r, s in zip(replies, scores) if not math.isfinite(s)][:3]})")
    return scores.float().to(rollout.ids.device)


def _minibatches(n: int, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=generator).chunk(count))


def ppo_update(policy: GPT, value_head: nn.Module, optimizer: torch.optim.Optimizer, rollout: Rollout, scores: torch.Tensor,
               ref_logprobs: torch.Tensor, config: RLConfig) -> dict[str, float]:
    """Several clipped epochs over one rollout: the learning half of PPO.

    When every reply scored the same and there is no KL term, the advantages are only the value
    head's errors; whitening would blow that noise up to unit size and Adam would take full
    steps on it (a converged policy collapses so), so such a rollout is skipped.
    """
    mask = rollout.response_mask
    if config.kl_coef == 0 and bool((scores == scores[0]).all()):
        return {"reward": scores.mean().item(), "kl": 0.0, "policy_loss": 0.0, "value_loss": float("nan"), "clip_fraction": 0.0}
    started = time.perf_counter()
    with torch.no_grad():
        _, old_values = response_logprobs(policy, rollout, value_head)
        rewards, _ = kl_penalized_rewards(scores, rollout.logprobs, ref_logprobs, mask, config.kl_coef)
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        advantages = whiten(advantages, mask)
    value_seconds = time.perf_counter() - started
    generator = torch.Generator().manual_seed(config.seed)
    stats = []
    for _ in range(config.epochs):
        for rows in _minibatches(len(scores), config.minibatches, generator):
            part = Rollout(rollout.ids[rows], rollout.mask[rows], rollout.prompt_width, rollout.logprobs[rows])
            logprobs, values = response_logprobs(policy, part, value_head)
            pg, clipped = policy_loss(logprobs, part.logprobs, advantages[rows], mask[rows], config.clip)
            vf = value_loss(values, old_values[rows], returns[rows], mask[rows], config.value_clip)
            optimizer.zero_grad(set_to_none=True)
            (pg + config.value_coef * vf).backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm)
            optimizer.step()
            stats.append((pg.item(), vf.item(), clipped.item()))
    pg, vf, clipped = (sum(s[i] for s in stats) / len(stats) for i in range(3))
    return {"reward": scores.mean().item(), "kl": reply_kl(rollout.logprobs, ref_logprobs, mask).mean().item(), "policy_loss": pg, "value_loss": vf, "clip_fraction": clipped,
            "seconds value pass": value_seconds}


def grpo_update(policy: GPT, optimizer: torch.optim.Optimizer, rollout: Rollout, scores: torch.Tensor, ref_logprobs: torch.Tensor | None,
                config: RLConfig) -> dict[str, float]:
    """`config.epochs` full-batch steps on one group rollout (trl's num_iterations; 1 is plain on-policy GRPO)."""
    mask = rollout.response_mask
    advantages = group_advantages(scores, config.samples_per_prompt)
    losses = []
    for _ in range(config.epochs):
        logprobs, _ = response_logprobs(policy, rollout)
        loss = grpo_loss(logprobs, rollout.logprobs, advantages, mask, config.clip, config.kl_coef, ref_logprobs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    kl = reply_kl(rollout.logprobs, ref_logprobs, mask).mean().item() if ref_logprobs is not None else float("nan")
    return {"reward": scores.mean().item(), "kl": kl, "loss": sum(losses) / len(losses)}


@dataclass
class RLState:
    """What a PPO or GRPO run carries from step to step."""
    policy: GPT
    tokenizer: object
    optimizer: torch.optim.Optimizer
    value_head: nn.Module | None = None


def new_state(policy: GPT, tokenizer, config: RLConfig) -> RLState:
    """AdamW over the adapters (and, for PPO, a fresh value head) of a LoRA policy."""
    if not lora.adapters(policy):
        raise ValueError("the policy has no LoRA adapters: attach them first (llmnb.lora.attach), they are what trains "
                         "and switching them off gives the reference")
    head = nn.Linear(policy.config.n_embd, 1, device=policy.wte.weight.device) if config.method == "ppo" else None
    if head is not None:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    params = [p for p in policy.parameters() if p.requires_grad] + (list(head.parameters()) if head is not None else [])
    return RLState(policy, tokenizer, torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0), head)


def _timed(timings: dict[str, float], name: str, started: float) -> float:
    now = time.perf_counter()
    timings[name] = timings.get(name, 0.0) + now - started
    return now


def rl_step(state: RLState, examples: list[Example], reward_fn: RewardFn, config: RLConfig, step: int) -> dict[str, float]:
    """One rollout and its updates, by `config.method`; also where the time went."""
    tok, policy, timings = state.tokenizer, state.policy, {}
    started = time.perf_counter()
    prompts = [prompt_ids(tok, e.prompt, e.system) for e in examples]
    rollout = sample_rollout(policy, prompts, config.max_new_tokens, tok.pad_token_id, tok.eos_token_id, config.seed * 100_003 + step,
                             config.samples_per_prompt)
    started = _timed(timings, "generation", started)
    replies = decode_responses(tok, rollout)
    scores = checked_scores(reward_fn, [e for e in examples for _ in range(config.samples_per_prompt)], replies, rollout, step)
    started = _timed(timings, "scoring", started)
    ref = reference_logprobs(policy, rollout)  # PPO's penalty, GRPO's beta term; without them still the KL the run reports
    started = _timed(timings, "reference pass", started)
    if config.method == "ppo":
        stats = ppo_update(policy, state.value_head, state.optimizer, rollout, scores, ref, config)
    else:
        stats = grpo_update(policy, state.optimizer, rollout, scores, ref, config)
    _timed(timings, "update", started)
    timings["update"] -= stats.get("seconds value pass", 0.0)  # PPO's value pass, timed on its own
    if stats["kl"] > config.max_kl:
        raise RuntimeError(f"the policy's KL from the reference reached {stats['kl']:.1f} nats per reply at step {step}, past max_kl="
                           f"{config.max_kl}: lower lr (now {config.lr}) or raise kl_coef (now {config.kl_coef})")
    return {**{f"seconds {k}": v for k, v in timings.items()}, **stats}


def train_rl(state: RLState, prompts: list[Example], reward_fn: RewardFn, config: RLConfig,
             on_step: Callable[[int, dict], None] | None = None, progress: bool = True) -> list[dict]:
    """`config.steps` steps (or until `config.seconds` run out), each on `prompts_per_step` prompts drawn in a seeded order.

    `on_step(step, stats)` runs after each step (validation checkpoints); its time is left out of the budget and of "elapsed".
    """
    if len(prompts) < config.prompts_per_step:
        raise ValueError(f"{len(prompts)} prompts, fewer than prompts_per_step={config.prompts_per_step}")
    order, history, started = [], [], time.perf_counter()
    rng = random.Random(config.seed)
    bar = tqdm(range(config.steps), desc=config.method.upper(), disable=not progress, mininterval=1)
    for step in bar:
        if config.seconds is not None and time.perf_counter() - started > config.seconds:
            _stopped_at_budget(bar, config.seconds)
            break
        while len(order) < config.prompts_per_step:
            order += rng.sample(range(len(prompts)), len(prompts))
        batch, order = [prompts[i] for i in order[:config.prompts_per_step]], order[config.prompts_per_step:]
        stats = {"step": step, **rl_step(state, batch, reward_fn, config, step), "elapsed": time.perf_counter() - started}
        history.append(stats)
        bar.set_postfix(reward=f"{stats['reward']:.2f}", kl=f"{stats['kl']:.2f}")
        if on_step is not None:
            started += _timed_call(on_step, step, stats)  # validation is not the method's time
    return history


def _stopped_at_budget(bar: tqdm, seconds: float) -> None:
    """End a loop's bar at the step the time budget stopped it, saying so: a bar left at "1 %" reads as a crash."""
    bar.total = bar.n
    bar.set_postfix_str(f"{bar.postfix + ', ' if bar.postfix else ''}stopped by the {seconds:g} s budget", refresh=False)
    bar.close()


def _timed_call(fn: Callable, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


@torch.no_grad()
def kl_from_reference(policy: GPT, tokenizer, examples: list[Example], max_new_tokens: int, samples: int = 2, seed: int = 1234) -> float:
    """Mean KL(policy || reference) per reply, in nats, never negative.

    At every position of the policy's sampled replies, the KL between the two next-token
    distributions over the whole vocabulary, summed over the reply: by the chain rule its mean
    is the KL between the two models' reply distributions, with far less noise than
    log pi - log ref of the sampled tokens alone (which can come out negative).
    """
    prompts = [prompt_ids(tokenizer, e.prompt, e.system) for e in examples]
    rollout = sample_rollout(policy, prompts, max_new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id, seed, samples)
    logprobs = policy.lm_head(response_hidden(policy, rollout)).float().log_softmax(-1)  # (B, R, vocab)
    with lora.disabled(policy):
        ref = policy.lm_head(response_hidden(policy, rollout)).float().log_softmax(-1)
    per_token = (logprobs.exp() * (logprobs - ref)).sum(-1)  # (B, R)
    return (per_token * rollout.response_mask).sum(-1).mean().item()


# --- judging: the validation split chooses, the test split reports, once -------------------------


@dataclass(frozen=True)
class Splits:
    train: list[Example]  # what the methods learn from (prompts, preference pairs)
    val: list[Example]  # chooses checkpoints, settings and the model to keep
    test: list[Example]  # scored once, at the end: the numbers reported


def arithmetic_splits(trained_on: list[Example], n_train: int, n_val: int, n_test: int, seed: int) -> Splits:
    """Three disjoint sets of problems from reasoning-gym's stream at `seed`, none sharing an expression with each
    other or with `trained_on` (notebook 04's training set)."""
    total = n_train + n_val + n_test
    pool, seen = [], {e.source for e in trained_on}
    for example in arithmetic_examples(3 * total, seed):
        if example.source not in seen:
            seen.add(example.source)
            pool.append(example)
    if len(pool) < total:
        raise ValueError(f"only {len(pool)} distinct unseen problems for {total} asked: ask for fewer, or raise max_digits")
    return Splits(pool[:n_train], pool[n_train:n_train + n_val], pool[n_train + n_val:total])


def adapter_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every LoRA weight (a checkpoint of what trains)."""
    return {f"{name}.{part}": getattr(layer, part).detach().clone() for name, layer in lora.adapters(policy).items()
            for part in ("lora_A", "lora_B")}


@torch.no_grad()
def load_adapter_state(policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, layer in lora.adapters(policy).items():
        layer.lora_A.copy_(state[f"{name}.lora_A"])
        layer.lora_B.copy_(state[f"{name}.lora_B"])


class ValidationCheckpoints:
    """Scores a LoRA policy on the validation split at the start and every `every_seconds` of training, keeping the
    adapters of the best.

    Pass it as a training loop's `on_step` (its time is not the method's); `finish` scores the last state and
    puts the best back. `score(policy)` returns one right/wrong per validation problem. The start is a
    candidate too, so a run that never beats it returns to it; ties go to the earlier checkpoint.
    """

    def __init__(self, policy: nn.Module, score: Callable[[nn.Module], list[bool]], every_seconds: float,
                 distance: Callable[[nn.Module], float] | None = None, start: list[bool] | None = None):
        self.policy, self.score, self.every, self.distance = policy, score, every_seconds, distance
        self.records: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] = {}
        self.check(0, 0.0, start)  # `start`: the starting model's scores, when known (runs that share a start score it once)

    def __call__(self, step: int, stats: dict) -> None:
        if stats["elapsed"] >= self.records[-1]["train seconds"] + self.every:
            self.check(step + 1, stats["elapsed"])

    def check(self, steps: int, seconds: float, right: list[bool] | None = None) -> None:
        right = [bool(x) for x in (self.score(self.policy) if right is None else right)]
        record = {"steps": steps, "train seconds": seconds, "val accuracy": sum(right) / len(right), "right": right}
        if self.distance is not None and steps == 0:
            record["KL from start"] = 0.0
        elif self.distance is not None:
            record["KL from start"] = self.distance(self.policy)
        self.records.append(record)
        if self.best is None or record["val accuracy"] > self.best["val accuracy"]:
            self.best, self.best_state = record, adapter_state(self.policy)

    def finish(self, history: list[dict]) -> dict:
        """Score the run's last state (unless just scored), load the best adapters; the best record."""
        if history and self.records[-1]["steps"] != len(history):
            self.check(len(history), history[-1]["elapsed"])
        load_adapter_state(self.policy, self.best_state)
        return self.best


@dataclass
class Judgement:
    chosen: str  # the model the validation split picks
    rows: dict[str, dict[str, float]]  # per model: val and test accuracy, the test interval, the paired difference from the baseline


def judge(val_right: dict[str, list[bool]], test_right: dict[str, list[bool]], baseline: str) -> Judgement:
    """Choose on the validation split (ties: the baseline, then the earlier listed), report on the test split.

    Each model's test accuracy with its 95 % Wilson interval, and its difference from the baseline on the same
    problems with a 95 % interval and McNemar's exact p. The test scores never enter the choice.
    """
    if baseline not in val_right or set(val_right) != set(test_right):
        raise ValueError(f"every model needs validation and test scores, the baseline {baseline!r} among them; got "
                         f"{sorted(val_right)} and {sorted(test_right)}")
    names = [baseline] + [n for n in val_right if n != baseline]
    val = {n: sum(val_right[n]) / len(val_right[n]) for n in names}
    chosen = max(names, key=lambda n: (val[n], -names.index(n)))
    rows = {}
    for name in names:
        right, n = sum(test_right[name]), len(test_right[name])
        diff, low, high, p = paired_difference([float(x) for x in test_right[baseline]], [float(x) for x in test_right[name]])
        rows[name] = {"val accuracy": val[name], "test accuracy": right / n, "test 95% low": wilson_interval(right, n)[0],
                      "test 95% high": wilson_interval(right, n)[1], "change": diff, "change 95% low": low, "change 95% high": high,
                      "McNemar p": p}
    return Judgement(chosen, rows)
