import math

import pytest

from llmnb import metrics


def test_accuracy_exact_match_and_perplexity_load_offline_and_compute():
    assert metrics.load("accuracy").compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0])["accuracy"] == 0.5
    em = metrics.load("exact_match")
    assert em.compute(predictions=["Paris."], references=["paris"])["exact_match"] == 0.0
    assert em.compute(predictions=[" Paris. "], references=["paris"], ignore_case=True, ignore_punctuation=True)["exact_match"] == 1.0
    result = metrics.load("perplexity").compute(nll=[2.0, 4.0], tokens=[2, 2])
    assert result["loss"] == 1.5 and math.isclose(result["perplexity"], math.exp(1.5))


def test_unknown_metric_and_empty_input_are_refused():
    with pytest.raises(ValueError, match="llmnb ships"):
        metrics.load("bleu")
    with pytest.raises(ValueError, match="at least one"):
        metrics.load("perplexity").compute(nll=[], tokens=[])
