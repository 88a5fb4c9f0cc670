"""llmnb.evaluation: reply loss and greedy replies against transformers on the same weights, perplexity against a direct
computation, intervals against their textbook values, McNemar against scipy's binomial test, and the contamination
check on planted duplicates."""
import math

import pytest
import torch

from llmnb import evaluation, sft
from llmnb.evaluation import contaminated, mcnemar_p, paired_difference, perplexity, wilson_interval
from llmnb.model import GPT, GPTConfig


def test_wilson_interval_matches_its_formula_and_stays_inside_0_1():
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.27753, abs=1e-4)  # the textbook value for 0 of 10
    low, high = wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.40383, 0.59617), abs=1e-4)
    with pytest.raises(ValueError, match="at least one item"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="between 0 and n"):
        wilson_interval(11, 10)


def test_mcnemar_and_the_paired_difference_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for gained, lost in [(9, 2), (0, 0), (3, 3), (20, 7)]:
        expected = stats.binomtest(min(gained, lost), gained + lost, 0.5).pvalue if gained + lost else 1.0
        assert mcnemar_p(gained, lost) == pytest.approx(expected, rel=1e-9)
    a = [0, 0, 1, 1, 0, 1, 0, 0, 1, 0]
    b = [1, 0, 1, 1, 1, 1, 1, 0, 1, 0]  # 3 gained, 0 lost
    diff, low, high, p = paired_difference(a, b)
    diffs = [y - x for x, y in zip(a, b)]
    sd = math.sqrt(sum((d - 0.3) ** 2 for d in diffs) / 9)
    assert diff == pytest.approx(0.3) and (high - low) / 2 == pytest.approx(1.959964 * sd / math.sqrt(10), rel=1e-5)
    assert p == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_difference([1], [1, 0])


def test_contamination_finds_a_planted_duplicate_and_only_it():
    training = ["Now is the winter of our discontent made glorious summer by this sun of York, and all the clouds that lour'd",
                "What is 12 plus 7?"]
    items = ["NOW is the winter of our discontent made glorious summer by this sun of York; and all",  # 13+ words, case and punctuation differ
             "Now is the winter of our content made glorious summer by this son of Yorkshire and all the",  # no 13-gram in common
             "what is 12 plus 7",   # short: found whole
             "what is 13 plus 7",
             "Compute 12 + 7.", "Compute 12 - 7."]  # operators are not punctuation here: only the first was trained on
    training.append("Compute 12 + 7 .")
    assert contaminated(items, training) == [True, False, True, False, True, False]


def test_perplexity_is_the_exponent_of_the_mean_next_token_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig.llama(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    windows = torch.randint(0, 64, (3, 17))
    with torch.no_grad():
        logits, _ = model(windows)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), windows[:, 1:].reshape(-1))
    assert perplexity(model, windows, batch_size=2) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_response_loss_and_greedy_answers_agree_with_transformers_on_the_same_weights(tiny_base, chat_tokenizer):
    from transformers import AutoModelForCausalLM

    folder, ours = tiny_base
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    examples = sft.arithmetic_examples(6, seed=4)
    rendered = sft.pairs(chat_tokenizer, examples)
    nll = evaluation.response_nll(ours, rendered, batch_size=4)
    assert nll == pytest.approx(evaluation.response_nll(theirs, rendered, batch_size=3), abs=1e-4)
    # and directly: the cross-entropy of each response token given everything before it, one example at a time
    direct = []
    for prompt, response in rendered:
        logits = theirs(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
        direct.append(torch.nn.functional.cross_entropy(logits, torch.tensor(response), reduction="sum").item())
    assert nll == pytest.approx(sum(direct) / sum(len(r) for _, r in rendered), abs=1e-4)
    prompts = [e.prompt for e in examples]  # of different lengths: left padding must not change a reply
    ours_replies = evaluation.answers(ours, chat_tokenizer, prompts, sft.ARITHMETIC_SYSTEM, max_new_tokens=6, batch_size=4)
    assert ours_replies == evaluation.answers(theirs, chat_tokenizer, prompts, sft.ARITHMETIC_SYSTEM, max_new_tokens=6, batch_size=6)
    assert ours_replies[1] == evaluation.answers(ours, chat_tokenizer, prompts[1:2], sft.ARITHMETIC_SYSTEM, max_new_tokens=6)[0]


def test_the_last_number_of_a_reply_is_its_answer():
    assert [evaluation.last_number(t) for t in ("5", "8 - 3 = 5.", "It is -12", "1,024", "none")] == ["5", "5", "-12", "1024", None]
