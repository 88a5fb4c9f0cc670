import pytest

from llmnb import presets


def test_every_preset_defines_the_same_knobs_per_notebook():
    notebooks = {nb for p in presets.PRESETS.values() for nb in p}
    for nb in notebooks:
        keys = [set(presets.PRESETS[p][nb]) for p in presets.PRESET_NAMES]
        assert all(k == keys[0] for k in keys), f"notebook {nb}: presets differ in their knobs"


def test_auto_follows_environment_then_hardware(monkeypatch):
    monkeypatch.setenv("LLMNB_PRESET", "smoke")
    assert presets.resolve_preset("auto") == "smoke"
    monkeypatch.delenv("LLMNB_PRESET")
    assert presets.resolve_preset("auto") in {"cpu", "gpu"}


def test_overrides_apply_and_none_keeps_the_preset():
    cfg = presets.configure("00", "smoke", measure_steps=7, measure_layers=None)
    assert cfg.measure_steps == 7
    assert cfg.measure_layers == presets.PRESETS["smoke"]["00"]["measure_layers"]
    assert cfg.preset == "smoke"


def test_bad_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="smoke, cpu, gpu"):
        presets.resolve_preset("fast")
    with pytest.raises(ValueError, match="unknown parameter"):
        presets.configure("00", "smoke", measure_stepz=3)
    with pytest.raises(ValueError, match="no values for notebook"):
        presets.configure("42", "smoke")
