"""Exact match: the fraction of generated strings equal to their reference, after optional normalisation."""
import re
import string

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions identical to the reference, optionally ignoring case, punctuation and surrounding space.",
            citation="",
            inputs_description="predictions, references: lists of strings; ignore_case, ignore_punctuation: bools",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case=False, ignore_punctuation=False):
        if not predictions:
            raise ValueError("exact_match needs at least one prediction")

        def norm(text):
            text = text.strip()
            if ignore_case:
                text = text.lower()
            if ignore_punctuation:
                text = re.sub(f"[{re.escape(string.punctuation)}]", "", text)
            return " ".join(text.split())

        return {"exact_match": sum(norm(p) == norm(r) for p, r in zip(predictions, references)) / len(predictions)}
