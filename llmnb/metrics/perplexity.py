"""Perplexity from per-sequence negative log-likelihoods: exp(total NLL / total tokens).

Model-agnostic on purpose: any model (ours, transformers, a quantized one) supplies the
summed NLL (in nats) and the token count of each sequence.
"""
import math

import datasets
import evaluate


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Token-weighted perplexity: exp(sum of NLL / sum of tokens), with NLL in nats.",
            citation="",
            inputs_description="nll: summed negative log-likelihood per sequence; tokens: predicted tokens per sequence",
            features=datasets.Features({"nll": datasets.Value("float64"), "tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, tokens):
        total = sum(tokens)
        if total <= 0:
            raise ValueError("perplexity needs at least one predicted token")
        loss = sum(nll) / total
        return {"perplexity": math.exp(loss), "loss": loss}
