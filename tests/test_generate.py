import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from llmnb import model as M
from llmnb.generate import generate, generate_stream, sample

@pytest.mark.cpu_paths
def test_greedy_generation_matches_transformers_single_and_left_padded(pair):
    ours, hf = pair
    x = torch.randint(1, 320, (2, 8))
    assert torch.equal(generate(ours, x[:1], 12, temperature=0), hf.generate(x[:1], max_new_tokens=12, do_sample=False, pad_token_id=0))
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[1:, :5]], dim=1)
    ids = torch.cat([x[:1], ids])
    mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    ours_out = generate(ours, ids, 10, temperature=0, attention_mask=mask)
    assert torch.equal(ours_out, hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0))
    alone = generate(ours, x[1:, :5], 10, temperature=0)
    assert torch.equal(ours_out[1, 8:], alone[0, 5:]), "padding must not change a row's continuation"


def test_cache_math_path_and_no_cache_agree(pair):
    ours, _ = pair
    x = torch.randint(0, 320, (2, 6))
    assert torch.equal(generate(ours, x, 15, temperature=0), generate(ours, x, 15, temperature=0, use_cache=False))
    math = M.GPT(M.GPTConfig(**{**ours.config.__dict__, "attention": "math"})).eval()
    math.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(math(x)[0], ours(x)[0], atol=1e-5, rtol=0)


def test_sampling_filters_match_transformers_processors():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    seq = torch.randint(0, 50, (3, 7))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seq, logits.clone())
    kept = torch.isfinite(TopPLogitsWarper(0.8)(seq, TopKLogitsWarper(10)(seq, ref.clone() / 0.7)))
    for row in range(3):
        draws = {int(sample(logits[row:row + 1], seq[row:row + 1], 0.7, 10, 0.8, 1.3, torch.Generator().manual_seed(s))) for s in range(200)}
        assert draws <= set(kept[row].nonzero().flatten().tolist()), "sampled a token that transformers' filters drop"
    greedy = sample(logits, seq, 0.0, None, None, 1.3, None)
    assert torch.equal(greedy, ref.argmax(-1))


def test_seeded_sampling_is_repeatable_and_top_k_1_is_greedy(pair):
    ours, _ = pair
    x = torch.randint(0, 320, (2, 5))
    a = generate(ours, x, 20, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(a, generate(ours, x, 20, temperature=1.0, top_p=0.9, seed=7))
    assert not torch.equal(a, generate(ours, x, 20, temperature=1.0, top_p=0.9, seed=8))
    assert torch.equal(generate(ours, x, 10, top_k=1, seed=3), generate(ours, x, 10, temperature=0))


def test_stop_tokens_and_streaming(pair):
    ours, _ = pair
    x = torch.randint(0, 320, (2, 5))
    greedy = generate(ours, x, 20, temperature=0)
    stop = int(greedy[0, 7])  # a token row 0 produces
    out = generate(ours, x, 20, temperature=0, stop_tokens=[stop])
    first = (out[0, 5:] == stop).nonzero()[0].item()
    assert torch.equal(out[0, 5:5 + first], greedy[0, 5:5 + first])
    streamed = []
    full = generate(ours, x, 6, temperature=0, on_token=streamed.append)
    assert torch.equal(torch.stack(streamed, 1), full[:, 5:])
    assert len(list(generate_stream(ours, x, 6, temperature=0))) == 6


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature"),
    ({"top_k": 0}, "top_k"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_bad_sampling_arguments_raise_clear_errors(pair, kwargs, message):
    ours, _ = pair
    with pytest.raises(ValueError, match=message):
        generate(ours, torch.zeros(1, 3, dtype=torch.long), 2, **kwargs)



def test_sampled_logprobs_are_the_models_own(pair):
    """What generation reports for each sampled token equals token_logprobs on the finished text (the RLHF ratio's base)."""
    ours, _ = pair
    x = torch.randint(1, 320, (2, 6))
    tokens, logprobs = generate(ours, x, 10, temperature=0.9, top_k=50, seed=4, return_logprobs=True)
    assert logprobs.shape == (2, 10)
    with torch.no_grad():
        torch.testing.assert_close(logprobs, M.token_logprobs(ours, tokens)[:, 5:], atol=1e-5, rtol=0)
    stop = int(tokens[0, 8])
    stopped, stopped_lp = generate(ours, x, 10, temperature=0.9, top_k=50, seed=4, stop_tokens=[stop], return_logprobs=True)
    first = (stopped[0, 6:] == stop).nonzero()[0].item()
    assert (stopped_lp[0, first + 1:] == 0).all(), "tokens after a stop are padding, with log-probability 0"


def test_bad_lengths_raise_clear_errors(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(ours, torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="non-negative"):
        generate(ours, torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(ours, torch.zeros(1, 0, dtype=torch.long), 3)


def test_sampling_draws_tokens_at_their_probabilities():
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 1.0]]).repeat(20000, 1)
    draws = sample(logits, torch.empty(20000, 0, dtype=torch.long), 1.0, None, None, 1.0, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=5).float() / 20000
    assert frequencies[3] == 0  # a -inf logit is never drawn
    p = logits[0].softmax(-1)
    standard_error = (p * (1 - p) / 20000).sqrt()  # of a frequency over 20000 draws; the seeded stream is the same on any CPU
    assert ((frequencies - p).abs() <= 4 * standard_error).all(), (frequencies - p) / standard_error


def test_samples_of_one_prompt_share_its_prefill_and_equal_separate_sampling(pair):
    """samples=n prefills each prompt once; the tokens and log-probabilities are those of the prompt repeated n times."""
    ours, _ = pair
    x = torch.randint(1, 320, (3, 7))
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # a left-padded row
    shared, shared_lp = generate(ours, x, 9, temperature=1.0, seed=11, attention_mask=mask, samples=4, return_logprobs=True)
    separate, separate_lp = generate(ours, x.repeat_interleave(4, 0), 9, temperature=1.0, seed=11,
                                     attention_mask=mask.repeat_interleave(4, 0), return_logprobs=True)
    assert shared.shape == (12, 16)
    assert torch.equal(shared, separate)
    torch.testing.assert_close(shared_lp, separate_lp, atol=1e-5, rtol=0)
    assert len({tuple(r) for r in shared[:4, 7:].tolist()}) > 1, "the samples of one prompt must differ, not be copies"
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        generate(ours, x, 2, samples=0)


@pytest.mark.cpu_paths
def test_prompts_sharing_a_system_message_read_it_once_with_the_same_result(pair):
    """The shared opening of every prompt is prefilled once; tokens and log-probabilities equal reading each row alone."""
    from llmnb.data import pad_rows
    from llmnb.generate import common_prefix

    ours, _ = pair
    system = torch.randint(1, 320, (9,)).tolist()
    prompts = [system + [5, 6, 7], system + [8], system + [9, 10, 11, 12, 13]]
    ids, mask = pad_rows(prompts, 0, "left")
    assert common_prefix(ids, mask) == 9
    assert common_prefix(torch.tensor([[1, 2, 3], [2, 2, 3]]), None) == 0, "rows that differ at the first token share nothing"
    assert common_prefix(*pad_rows([[1, 2], [1, 2]], 0, "left")) == 1, "each row keeps a token of its own to predict from"
    tokens, logprobs = generate(ours, ids, 6, temperature=0.8, seed=2, attention_mask=mask, samples=2, return_logprobs=True)
    for i, prompt in enumerate(prompts):
        greedy = generate(ours, torch.tensor([prompt]), 6, temperature=0)
        row = generate(ours, ids, 6, temperature=0, attention_mask=mask)[i, ids.shape[1]:]
        assert torch.equal(row, greedy[0, len(prompt):])
        with torch.no_grad():
            direct = M.token_logprobs(ours, torch.cat([torch.tensor(prompt), tokens[2 * i, ids.shape[1]:]])[None])[0, len(prompt) - 1:]
        torch.testing.assert_close(logprobs[2 * i], direct, atol=1e-5, rtol=0)
