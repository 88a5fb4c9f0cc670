import time

import pytest
import torch

from llmnb import models


def test_smollm2_converts_loads_and_answers():
    model, tokenizer = models.load_model("smollm2-135m-instruct")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_folder_is_used_as_is_and_a_non_model_folder_is_refused(tmp_path):
    assert models.resolve_model(str(models.prepare_smollm2())) == str(models.prepare_smollm2())
    with pytest.raises(models.ModelNotFound, match="no config.json"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(models.ModelNotFound, match="no model folder"):
        models.resolve_model(str(tmp_path / "missing"))


def test_uncached_hub_id_offline_fails_fast_with_the_alternatives():
    start = time.perf_counter()
    with pytest.raises(models.ModelNotFound, match="smollm2-135m-instruct"):
        models.resolve_model("someone/never-downloaded-model")
    assert time.perf_counter() - start < 5
