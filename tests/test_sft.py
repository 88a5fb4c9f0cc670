import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llmnb import sft
from llmnb.data import Document


def test_arithmetic_problems_are_reproducible_their_answers_right_and_held_out_ones_unseen():
    train = sft.arithmetic_examples(300, seed=1)
    assert train == sft.arithmetic_examples(300, seed=1) and train != sft.arithmetic_examples(300, seed=2)
    for e in train[:50]:
        assert int(e.answer) == eval(e.source)  # the expression, e.g. "37 + 5", is plain Python arithmetic
        assert e.response == e.answer and e.source.split()[0] in e.prompt
    assert sft.arithmetic_examples(300, seed=2)[:-1] == train[1:], "reasoning-gym draws item i with seed + i"
    assert len(sft.held_out(train, sft.arithmetic_examples(300, seed=2))) <= 1, "the naive 'another seed' split holds out nothing"
    train, test = sft.arithmetic_split(300, 100, seed=1)
    assert len(test) == 100 and not {e.source for e in test} & {e.source for e in train}


def test_dialogue_pairs_answer_a_line_with_the_next_speakers_reply():
    doc = Document(id="hamlet/ACT I/SCENE I", text="BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me.\nStand.\n\nFRANCISCO:\nAgain.\n\nHORATIO:\n"
                   + "x" * 500)
    examples = sft.dialogue_examples([doc])
    assert examples == [sft.Example("Bernardo: Who's there?\n\nReply as Francisco.", "Nay, answer me.\nStand.", source="hamlet",
                                    system=sft.CHARACTER_SYSTEM)]


def test_instruction_files_in_alpaca_dolly_and_prompt_formats_and_rows_that_miss_a_field(tmp_path):
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Greet", "context": "", "response": "Hello"},
            {"prompt": "Say hi", "completion": "hi"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    examples = sft.read_examples(path)
    assert [(e.prompt, e.response) for e in examples] == [("Add\n\n2 and 3", "5"), ("Greet", "Hello"), ("Say hi", "hi")]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "Add"}) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl line 2 has fields \['instruction'\]"):
        sft.read_examples(path)
    path.write_text(json.dumps({"instruction": "Add", "output": ""}))
    with pytest.raises(ValueError, match="line 1: 'instruction' and 'output' must be non-empty"):
        sft.read_examples(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        sft.read_examples(path)
    with pytest.raises(FileNotFoundError, match="JSONL file"):
        sft.read_examples(tmp_path / "missing.jsonl")


def test_rendering_keeps_the_chat_template_and_the_reply_ends_with_the_end_of_turn(chat_tokenizer):
    example = sft.Example("What is 2 + 3?", "5")
    prompt, response = sft.render(chat_tokenizer, example, sft.ARITHMETIC_SYSTEM)
    assert (prompt, response) == sft.render(chat_tokenizer, sft.Example("What is 2 + 3?", "5", system=sft.ARITHMETIC_SYSTEM), "other")
    text = chat_tokenizer.decode(prompt)
    assert text.startswith("<|im_start|>system\nAnswer with the number only.") and text.endswith("<|im_start|>assistant\n")
    assert chat_tokenizer.decode(response) == "5<|im_end|>\n" and chat_tokenizer.eos_token_id in response
    assert sft.prompt_ids(chat_tokenizer, example.prompt, sft.ARITHMETIC_SYSTEM) == prompt
    from llmnb.tokenizer import CharTokenizer

    chars = CharTokenizer(sorted(set(sft.PLAIN_TEMPLATE + "What is 2 + 3?5")))
    prompt, response = sft.render(chars, example)
    assert chars.decode(prompt).endswith("### Response:\n") and chars.decode(response) == "5"


def test_batches_mask_the_prompt_and_refuse_a_dataset_smaller_than_one_batch(chat_tokenizer):
    examples = sft.arithmetic_examples(8, seed=3)
    data = sft.batches(chat_tokenizer, examples, block_size=64, seed=0, batch_size=4)
    x, y = data.batch(0, 0, 4, "cpu")
    for row_x, row_y in zip(x, y):
        learned = chat_tokenizer.decode(row_y[row_y != -100])
        assert learned.endswith("<|im_end|>\n") and "assistant" not in learned and len(learned) <= len("-99<|im_end|>\n")
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        sft.batches(chat_tokenizer, examples, block_size=64, seed=0, batch_size=16)


def run_sft(base, data, out, *settings, nproc=1, lora_r=4):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable]
    common = ["block_size=64", "max_steps=4", "lr=0.01", "warmup_steps=1", "log_interval=1", "eval_interval=100", f"out_dir={json.dumps(str(out))}"]
    run = subprocess.run([*launcher, "-m", "llmnb.sft", "--base", str(base), "--data", str(data), "--lora-r", str(lora_r),
                          "--system", sft.ARITHMETIC_SYSTEM, "--set", *common, *settings], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.long
def test_two_processes_train_the_same_adapter_as_one_process_on_the_same_global_batch(tiny_base, tmp_path):
    """Replies of 1 to 4 digits: each rank learns a different number of tokens, so the DDP mean must weigh them."""
    rows = [{"prompt": f"Say {i}", "response": str(7 ** (i % 9))} for i in range(40)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(map(json.dumps, rows)))
    folder, _ = tiny_base
    run_sft(folder, data, tmp_path / "one", "batch_size=8")
    run_sft(folder, data, tmp_path / "two", "batch_size=4", nproc=2)
    one, two = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and len(one) == 2 * 2 * 7
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    assert any(one[k].abs().max() > 0 for k in one if "lora_B" in k), "the adapters trained"


@pytest.mark.long
def test_full_fine_tuning_under_fsdp_writes_a_model_transformers_loads(tiny_base, tmp_path):
    from transformers import pipeline

    rows = [{"instruction": f"Say {i}", "output": str(i)} for i in range(16)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(map(json.dumps, rows)))
    folder, _ = tiny_base
    run_sft(folder, data, tmp_path / "full", "batch_size=2", 'distributed="fsdp"', nproc=2, lora_r=0)
    chat = pipeline("text-generation", model=str(tmp_path / "full" / "model"))
    reply = chat([{"role": "user", "content": "Say 3"}], max_new_tokens=3, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
