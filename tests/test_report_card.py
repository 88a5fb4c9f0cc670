"""llmnb.report_card: task files that lm-eval's own loader reads back, our GPT under the harness equal to its `hf` model type,
our bits per byte equal to a direct computation, and refusals that say what to do."""
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmnb import report_card as rc  # noqa: E402
from llmnb.assets import TINY_CHAT  # noqa: E402
from llmnb.checkpoint import load, resolve_model  # noqa: E402
from llmnb.model import token_logprobs  # noqa: E402

SIZES = rc.TaskSizes(lastword=6, nextline=4, arithmetic=6, passages=2, passage_chars=300)


@pytest.fixture(scope="module")
def tiny():
    folder = resolve_model(TINY_CHAT)
    model, tokenizer = load(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def task_dir(tiny, tmp_path_factory):
    return rc.write_tasks(tmp_path_factory.mktemp("tasks"), rc.task_items(SIZES, tiny[2]))


def test_task_files_round_trip_through_lm_evals_loader(task_dir):
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(task_dir), include_defaults=False).load(list(rc.TASKS))["tasks"]
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert docs == rc.read_items(task_dir, name), name
        assert task.OUTPUT_TYPE == rc.TASKS[name].output_type
    nextline = tasks["llmnb_nextline"]
    doc = next(iter(nextline.test_docs()))
    assert nextline.doc_to_choice(doc) == doc["choices"] and nextline.doc_to_target(doc) == doc["gold"]


def test_held_out_items_come_from_scenes_no_model_trained_on():
    from llmnb import data, sft

    scenes = rc.heldout_scenes(0.1)
    cleaned, _ = data.clean(data.load_corpus("shakespeare"))
    train, _ = data.split_documents(cleaned.documents, 0.1)
    assert scenes and not {d.id for d in scenes} & {d.id for d in train}
    plays = sft.held_out_plays(sft.dialogue_examples(data.load_corpus("shakespeare").documents))
    assert {d.id.split("/")[0] for d in scenes} <= plays


def test_our_gpt_under_the_harness_scores_as_its_hf_model_type(tiny, task_dir):
    from lm_eval.models.huggingface import HFLM

    folder, model, tokenizer = tiny
    ours_lm, hf_lm = rc.LlmnbLM(model, tokenizer, batch_size=4), HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4)
    text = "Now is the winter of our discontent"
    assert (ours_lm.prefix_token_id, ours_lm.eot_token_id, ours_lm.tok_encode(text)) == (hf_lm.prefix_token_id, hf_lm.eot_token_id,
                                                                                          hf_lm.tok_encode(text))
    ours = rc.score(ours_lm, None, task_dir)
    theirs = rc.score(hf_lm, None, task_dir)
    for name in rc.TASKS:
        assert ours[name]["items"] == theirs[name]["items"], name
        assert ours[name]["value"] == pytest.approx(theirs[name]["value"], rel=1e-4, abs=1e-6), name


def test_bits_per_byte_equal_a_direct_computation(tiny, task_dir):
    folder, model, tokenizer = tiny
    card = rc.score("hf", {"pretrained": str(folder)}, task_dir, ("llmnb_ppl_shakespeare",), batch_size=4)
    total, nbytes = 0.0, 0
    for item in rc.read_items(task_dir, "llmnb_ppl_shakespeare"):
        ids = [tokenizer.bos_token_id] + tokenizer.encode(item["text"], add_special_tokens=False)  # the first token, predicted from BOS
        with torch.no_grad():
            total += token_logprobs(model, torch.tensor([ids])).double().sum().item()
        nbytes += len(item["text"].encode())
    assert card["llmnb_ppl_shakespeare"]["value"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-4)


def test_refusals_say_what_to_do(tmp_path, task_dir):
    with pytest.raises(ValueError, match="unknown tasks"):
        rc.score("hf", {"pretrained": str(tmp_path)}, task_dir, ("hellaswagg",))
    with pytest.raises(FileNotFoundError, match="no Hugging Face model folder .* make it with its notebook"):
        rc.score("hf", {"pretrained": str(tmp_path / "nothing")}, task_dir, ("llmnb_lastword",))
    with pytest.raises(FileNotFoundError, match="build the tasks first"):
        rc.score("hf", {"pretrained": str(tmp_path)}, tmp_path, ("llmnb_lastword",))
    with pytest.raises(ValueError, match="ask for fewer"):
        rc.lastword_items(rc.heldout_scenes(0.1)[:1], 10_000)
    with pytest.raises(ValueError, match="unknown tasks"):
        rc.write_tasks(tmp_path, {"mmlu": []})
