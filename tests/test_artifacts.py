import json

import pytest

from llmnb import artifacts, data
from llmnb.assets import SMOLLM2, TINY_CHAT
from llmnb.checkpoint import load


def _write_marker(text: str):
    def write(tmp):
        tmp.mkdir(parents=True)
        (tmp / "weights.txt").write_text(text)
    return write


def test_folder_names_come_from_the_one_table():
    assert artifacts.path("tuned", base=SMOLLM2).relative_to(artifacts.outputs_root()).as_posix() == "models/smollm2-sft"
    assert artifacts.path("aligned", base=f"/somewhere/{SMOLLM2}").name == "smollm2-aligned"
    assert artifacts.path("tuned", base=TINY_CHAT).name == f"{TINY_CHAT}-sft"
    assert artifacts.path("quantized", model="outputs/models/smollm2-sft", scheme="int8").name == "smollm2-sft-int8"
    assert artifacts.path("gguf", model="smollm2-aligned", qtype="F16").as_posix().endswith("gguf/smollm2-aligned.F16.gguf")
    with pytest.raises(ValueError, match="unknown artifact kind 'tunde'"):
        artifacts.path("tunde", base=SMOLLM2)
    with pytest.raises(ValueError, match="pass base="):
        artifacts.path("tuned")


def test_a_folder_is_taken_only_with_its_kind_names_preset_settings_and_parent(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    model = artifacts.save("tuned", _write_marker("v1"), preset="smoke", recipe={"steps": 3}, base=TINY_CHAT)
    assert (model / "weights.txt").read_text() == "v1" and artifacts.provenance(model)["preset"] == "smoke"
    assert artifacts.find("tuned", "smoke", base=TINY_CHAT) == model
    assert artifacts.find("tuned", "smoke", {"steps": 3}, base=TINY_CHAT) == model
    assert artifacts.find("tuned", "smoke", {"steps": 4}, base=TINY_CHAT) is None, "settings asked for explicitly must match"
    assert artifacts.find("tuned", "cpu", base=TINY_CHAT) is None, "another preset's folder is not this preset's"
    assert artifacts.find("aligned", "smoke", base=TINY_CHAT) is None

    child = artifacts.save("quantized", _write_marker("q"), preset="smoke", parent=model, model=model, scheme="int8")
    grandchild = artifacts.save("gguf", lambda target: target.write_bytes(b"GGUF"), preset="smoke", parent=child, model=child, qtype="F16")
    assert artifacts.find("quantized", "smoke", model=model, scheme="int8") == child
    assert artifacts.find("gguf", "smoke", model=child, qtype="F16") == grandchild
    assert artifacts.provenance(child)["parent"]["path"] == f"models/{TINY_CHAT}-sft", "relative to outputs/: a moved checkout stays valid"
    artifacts.save("tuned", _write_marker("v2"), preset="smoke", recipe={"steps": 3}, base=TINY_CHAT)  # the parent trained again
    assert artifacts.find("quantized", "smoke", model=model, scheme="int8") is None, "a child of a rebuilt parent is stale"
    assert artifacts.find("gguf", "smoke", model=child, qtype="F16") is None, "and so is its child, though its own parent is unchanged"

    (model / artifacts.PROVENANCE).write_text("{not json")
    assert artifacts.provenance(model) is None and artifacts.find("tuned", "smoke", base=TINY_CHAT) is None
    (model / artifacts.PROVENANCE).unlink()  # a folder from before provenance existed: not taken either
    monkeypatch.setattr(artifacts, "resolve_model", lambda base: f"/registry/{base}")
    assert artifacts.find("tuned", "smoke", base=TINY_CHAT) is None and artifacts.latest(TINY_CHAT, "smoke").name == TINY_CHAT


def test_a_file_artifact_keeps_its_record_beside_it_and_what_no_recipe_makes_names_its_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    path = artifacts.save("gguf", lambda target: target.write_bytes(b"GGUF"), preset="smoke", model="m", qtype="F16")
    assert path.read_bytes() == b"GGUF" and json.loads(path.with_name(path.name + ".provenance.json").read_text())["kind"] == "gguf"
    assert artifacts.find("gguf", "smoke", model="m", qtype="F16") == path
    with pytest.raises(artifacts.ArtifactMissing, match="notebook 05 makes it.*llmnb run 05 --preset smoke"):
        artifacts.ensure("aligned", "smoke", base=TINY_CHAT)


def test_ensure_runs_notebook_03s_recipe_once_and_again_for_other_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    tokens = artifacts.ensure("tokens", "smoke", {"vocab_size": 300})
    assert data.read_meta(tokens).vocab_size == 300
    folder = artifacts.ensure("pretrained", "smoke", {"steps": 3})
    model, tokenizer = load(folder)
    assert folder.name == "llmnb-shakespeare" and model.config.vocab_size == 300 and len(tokenizer) <= 300
    assert artifacts.provenance(folder)["parent"]["id"] == artifacts.provenance(tokens)["id"]
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert artifacts.ensure("pretrained", "smoke", {"steps": 3}) == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    artifacts.ensure("tokens", "smoke", {"vocab_size": 320})  # notebook 01 run again with another vocabulary
    again = artifacts.ensure("pretrained", "smoke", {"steps": 3})
    assert load(again)[0].config.vocab_size == 320, "a model of the old token files is not taken for the new ones"


def test_ensure_tuned_trains_notebook_04s_recipe_once_per_base_and_latest_finds_it():
    folder = artifacts.ensure("tuned", "smoke", {"steps": 1, "n_train": 16, "n_dialogue_train": 8}, force=True, base=TINY_CHAT)
    record = artifacts.provenance(folder)
    assert folder.name == f"{TINY_CHAT}-sft" and record["names"] == {"base": TINY_CHAT} and record["recipe"]["steps"] == 1
    adapter = artifacts.path("tuned-adapter", base=TINY_CHAT)
    assert record["parent"]["id"] == artifacts.provenance(adapter)["id"]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"].endswith(TINY_CHAT)
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert artifacts.ensure("tuned", "smoke", {"steps": 1}, base=TINY_CHAT) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert artifacts.latest(TINY_CHAT, "smoke") == folder
    model, tokenizer = load(folder)
    assert len(tokenizer) > 1000 and not any("lora" in name for name, _ in model.named_parameters())
