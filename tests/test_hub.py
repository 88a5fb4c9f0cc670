import socket
import sys
import time

import pytest

from llmnb import hub


def test_explicit_setting_wins_without_probing(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: (_ for _ in ()).throw(AssertionError("probed")))
    assert hub.configure_hub() is True


def test_unreachable_hub_sets_every_offline_variable(monkeypatch):
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    if "huggingface_hub" in sys.modules:  # imported by an earlier test: its constants are patched, with a warning
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
        with pytest.warns(UserWarning, match="imported before llmnb"):
            assert hub.configure_hub() is True
        assert constants.HF_HUB_OFFLINE is True
    else:
        assert hub.configure_hub() is True
    assert all(hub.os.environ[name] == "1" for name in hub.OFFLINE_VARIABLES)


def test_reachable_hub_stays_online(monkeypatch):
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: True)
    assert hub.configure_hub() is False


def test_probe_is_quick_and_true_for_a_listening_local_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        assert hub.hub_reachable("127.0.0.1", server.getsockname()[1], timeout=1.0)
    finally:
        server.close()
    start = time.perf_counter()
    assert not hub.hub_reachable("127.0.0.1", 9, timeout=0.5)  # nothing listens on discard
    assert time.perf_counter() - start < 2.0


def test_importing_the_model_code_opens_no_connection_and_the_hub_library_settles_it():
    """The probe runs when huggingface_hub is first imported (transformers imports it), not at `import llmnb`."""
    import json
    import os
    import subprocess

    code = """
import json, os, socket, sys
calls = []
def refuse(*args, **kwargs):
    calls.append(args[0])
    raise OSError("no network in this test")
socket.create_connection = refuse
import llmnb.model, llmnb.generate, llmnb.train, llmnb.serve.app
before = (len(calls), "huggingface_hub" in sys.modules, os.environ.get("HF_HUB_OFFLINE"))
import transformers
print(json.dumps([before, len(calls), os.environ.get("HF_HUB_OFFLINE")]))
"""
    env = {k: v for k, v in os.environ.items() if k not in hub.OFFLINE_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    before, calls, offline = json.loads(out.strip().splitlines()[-1])
    assert before == [0, False, None], "importing llmnb's model code must not touch the network"
    assert calls == 1 and offline == "1", "the first import of the hub library probes once and goes offline"
