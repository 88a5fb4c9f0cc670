import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from llmnb import assets
from llmnb.data import load_corpus
from llmnb.checkpoint import resolve_model
from llmnb.tokenizer import CHAT_TOKENS, ENDOFTEXT, GPT2_SPLIT, GPT4_SPLIT, BPETokenizer, CharTokenizer, train_bpe

ADVERSARIAL = [
    "", " ", "  hello   world\n\n\t x", "I'm can't we've they'LL You'Re", "1234567 3.14159 1,000,000 0x1F",
    "def f(x):\n    return x**2  # comment\n", "héllo wörld 🙂🚀 👩‍👩‍👧 \U0001F600", "日本語のテキスト and עברית mixed Ελληνικά",
    "\u200b\ufeffzero\u00a0width", "a" * 500, " \n \r\n  \t\t\n", "<|endoftext|> after a special", "ends with spaces   ",
]


@pytest.fixture(scope="module")
def corpus_text():
    return load_corpus("shakespeare").text


@pytest.fixture(scope="module")
def trained():
    docs = [d.text for d in load_corpus("shakespeare").documents[:150]]
    return train_bpe(docs, 600, GPT4_SPLIT, special_tokens=[ENDOFTEXT, *CHAT_TOKENS])


@pytest.fixture(scope="module")
def gpt2():
    files = assets.gpt2_vocab_files()
    return BPETokenizer.from_gpt2_files(files["encoder.json"], files["vocab.bpe"])


def test_gpt2_ids_equal_tiktoken_on_the_whole_corpus_and_adversarial_strings(gpt2, corpus_text):
    tk = assets.tiktoken_encoding("gpt2")
    assert gpt2.encode(corpus_text) == tk.encode_ordinary(corpus_text)
    for s in ADVERSARIAL:
        assert gpt2.encode(s) == tk.encode_ordinary(s), s
        assert gpt2.encode(s, allowed_special="all") == tk.encode(s, allowed_special="all"), s


def test_gpt2_ids_equal_gpt2_tokenizer_fast(gpt2, corpus_text):
    files = assets.gpt2_vocab_files()
    hf = GPT2TokenizerFast(vocab=str(files["encoder.json"]), merges=str(files["vocab.bpe"]))
    assert len(hf) == 50257, "GPT2TokenizerFast must not load empty (transformers 5 ignores vocab_file=)"
    assert gpt2.encode(corpus_text, allowed_special="all") == hf(corpus_text)["input_ids"]
    for s in ADVERSARIAL:
        assert gpt2.encode(s, allowed_special="all") == hf(s)["input_ids"], s


def test_smollm2_ids_equal_its_hugging_face_tokenizer(corpus_text):
    path = resolve_model("smollm2-135m-instruct")
    hf = AutoTokenizer.from_pretrained(path)
    ours = BPETokenizer.from_hf_json(f"{path}/tokenizer.json")
    sample = corpus_text[:300_000]
    assert ours.encode(sample, allowed_special="all") == hf(sample, add_special_tokens=False)["input_ids"]
    for s in ADVERSARIAL + ["<|im_start|>user\nHi<|im_end|>\n"]:
        assert ours.encode(s, allowed_special="all") == hf(s, add_special_tokens=False)["input_ids"], s


def test_exported_tokenizer_json_encodes_identically(trained, tmp_path, corpus_text):
    path = trained.to_hf_json(tmp_path / "tokenizer.json")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for s in ADVERSARIAL + [corpus_text[:50_000], "<|im_start|>user\nhi<|im_end|>"]:
        assert trained.encode(s, allowed_special="all") == hf(s, add_special_tokens=False)["input_ids"], s[:40]
        assert hf.decode(hf(s, add_special_tokens=False)["input_ids"]) == trained.decode(trained.encode(s, allowed_special="all"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_round_trip_exactly_including_invalid_utf8(trained, gpt2, data):
    for tok in (trained, gpt2):
        assert tok.decode_bytes(tok.encode_bytes(data)) == data


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_round_trips_exactly(trained, gpt2, text):
    for tok in (trained, gpt2):
        assert tok.decode(tok.encode(text)) == text


def test_partial_utf8_decodes_to_replacement_characters_not_errors(trained):
    ids = trained.encode("🙂")
    assert len(ids) > 1, "a rare emoji spans several byte tokens in a small vocabulary"
    assert trained.decode_bytes(ids[:1]) == "🙂".encode()[: len(trained.vocab[ids[0]])]
    assert trained.decode(ids[:1]) == "\ufffd" * trained.decode(ids[:1]).count("\ufffd") != ""
    assert trained.encode("\ud800 lone surrogate")  # never fails


def test_training_is_deterministic_and_reaches_the_vocabulary_size(trained):
    again = train_bpe([d.text for d in load_corpus("shakespeare").documents[:150]], 600, GPT4_SPLIT, special_tokens=[ENDOFTEXT, *CHAT_TOKENS])
    assert again.merges == trained.merges
    assert trained.vocab_size == 600
    assert trained.special_tokens == {ENDOFTEXT: 597, "<|im_start|>": 598, "<|im_end|>": 599}


def naive_merge(word: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """The reference merge, written apart from llmnb's: every occurrence of `pair`, left to right."""
    out, i = [], 0
    while i < len(word):
        if tuple(word[i:i + 2]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def test_training_and_encoding_equal_a_naive_bpe_that_shares_no_code():
    """Recount every pair after every merge (the textbook algorithm), then encode by applying merges in rank order."""
    import regex
    from collections import Counter

    text = "low lower lowest newer wider new news " * 20 + "the then there these " * 15
    fast = train_bpe(text, 256 + 40, GPT2_SPLIT, special_tokens=())
    words = [list(c.encode()) for c in regex.findall(GPT2_SPLIT, text)]
    merges, vocab = {}, {i: bytes([i]) for i in range(256)}
    while len(vocab) < 256 + 40:
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merged = vocab[best[0]] + vocab[best[1]]
        new = next((i for i, b in vocab.items() if b == merged), len(vocab))
        vocab[new] = merged
        merges[best] = new
        words = [naive_merge(w, best, new) for w in words]
    assert fast.merges == merges
    probe = "the newest lower widest there, then news!"
    expected = []
    for chunk in regex.findall(GPT2_SPLIT, probe):
        ids = list(chunk.encode())
        for pair, new in merges.items():  # rank order: the order they were learned
            ids = naive_merge(ids, pair, new)
        expected += ids
    assert fast.encode(probe) == expected


def test_special_tokens_only_when_allowed(trained):
    text = f"a{ENDOFTEXT}b"
    assert trained.special_tokens[ENDOFTEXT] not in trained.encode(text)
    assert trained.encode(text, allowed_special="all") == trained.encode("a") + [trained.special_tokens[ENDOFTEXT]] + trained.encode("b")
    assert trained.decode(trained.encode(text, allowed_special="all")) == text
    with pytest.raises(ValueError, match="unknown special tokens"):
        trained.encode(text, allowed_special={"<|nope|>"})


def test_save_load_and_errors(trained, tmp_path):
    loaded = BPETokenizer.load(trained.save(tmp_path / "bpe.json"))
    assert loaded.encode("To be, or not to be") == trained.encode("To be, or not to be")
    with pytest.raises(ValueError, match="not an llmnb BPE file"):
        BPETokenizer.load(CharTokenizer("ab").save(tmp_path / "char.json"))
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        trained.decode([10**6])
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe("abc", 100)


def test_character_tokenizer(tmp_path):
    tok = CharTokenizer.train("hello world")
    assert tok.vocab_size == 8 and tok.decode(tok.encode("hello")) == "hello"
    assert CharTokenizer.load(tok.save(tmp_path / "c.json")).encode("low") == tok.encode("low")
    with pytest.raises(ValueError, match="not in this character vocabulary"):
        tok.encode("xyz")


@pytest.fixture(scope="module")
def shakespeare_texts():
    from llmnb import data

    return [d.text for d in data.load_corpus("shakespeare").documents[:80]]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_round_trips_text_it_never_saw_through_byte_pieces(shakespeare_texts, model_type):
    from llmnb.tokenizer import train_sentencepiece

    unseen = "Naïve café\n  東京 🙂 ∑x² — 1234"  # characters Shakespeare lacks, a newline, two spaces
    sp = train_sentencepiece(shakespeare_texts, 600, model_type)
    assert sp.get_piece_size() == 600
    ids = sp.encode(unseen)
    assert sp.decode(ids) == unseen
    pieces = [sp.id_to_piece(i) for i in ids]
    assert "<0xE6>" in pieces and "<0x0A>" in pieces, "CJK and the newline (never in a training line) are spelled in bytes"
    text = shakespeare_texts[0][:400]
    assert sp.decode(sp.encode(text)) == text and len(sp.encode(text)) < 0.75 * len(text.encode()), "it compresses what it saw"


def test_sentencepiece_without_byte_fallback_loses_unseen_characters_and_bad_types_are_refused(shakespeare_texts):
    from llmnb.tokenizer import train_sentencepiece

    sp = train_sentencepiece(shakespeare_texts, 600, "unigram", byte_fallback=False)
    assert sp.unk_id() in sp.encode("東京") and sp.decode(sp.encode("東京")) != "東京"
    with pytest.raises(ValueError, match="model_type must be 'unigram' or 'bpe'"):
        train_sentencepiece(shakespeare_texts, 600, "wordpiece")


# --- FolderTokenizer: a Hugging Face folder without AutoTokenizer -------------------------------------------------

CHAT_TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n\nnew lines ", "naïve café, 東京 🙂", "don't . , ? !",
              "<|im_start|>user\nhi<|im_end|>", ""]
CHATS = [[{"role": "user", "content": "What is 2 + 2?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 🙂"}, {"role": "user", "content": "Bye"}]]


def _bpe_folder(tmp_path):
    """Our BPE saved as transformers saves it, with a chat template that names its special tokens (as SmolLM2's does not)."""
    from llmnb.checkpoint import bpe_as_hf

    tok = bpe_as_hf(train_bpe(["to be or not to be, that is the question " * 40], 400, special_tokens=[ENDOFTEXT, *CHAT_TOKENS]))
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("which", ["smollm2", "bpe"])
def test_a_folder_tokenizer_gives_what_auto_tokenizer_gives(which, tmp_path):
    from llmnb.tokenizer import FolderTokenizer

    folder = resolve_model("smollm2-135m-instruct") if which == "smollm2" else _bpe_folder(tmp_path)
    light, auto = FolderTokenizer.open(folder), AutoTokenizer.from_pretrained(folder)
    assert light is not None and len(light) == len(auto) and light.eos_token_id == auto.eos_token_id is not None
    for text in CHAT_TEXTS:
        ids = light.encode(text)
        assert ids == auto.encode(text), text
        for skip in (False, True):
            assert light.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip), (text, skip)
    for chat in CHATS:
        assert light.chat_ids(chat) == list(auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                                     return_dict=True)["input_ids"])


# Templates that use what transformers gives a template beyond plain jinja2: trimmed blocks, tojson (non-ASCII kept,
# no HTML escaping), namespace, dict, break/continue, a generation block, raise_exception.
FEATURE_TEMPLATES = [
    "{% for m in messages %}\n  {{ m.role }}: {{ m.content | tojson }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% if loop.index > 2 %}{% break %}{% endif %}"
    "{{ ns.n }}{{ dict(r=m.role) | tojson(sort_keys=True) }}{% endfor %}",
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% if m.role == 'assistant' %}"
    "{% generation %}<a>{{ m.content }}</a>{% endgeneration %}{% else %}<u>{{ m.content }}</u>{% endif %}{% endfor %}",
    "{% if messages[0].role != 'user' %}{{ raise_exception('the first message must be the user\\'s') }}{% endif %}{{ messages | length }}",
]


@pytest.mark.parametrize("template", FEATURE_TEMPLATES)
def test_chat_templates_render_as_transformers_renders_them(template):
    """Rendered text (or the error) equal to transformers' own renderer, an independent implementation."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    from llmnb.tokenizer import compile_chat_template

    for chat in CHATS + [[{"role": "user", "content": "<b>\"quoted\" & naïve 東京</b>"}]]:
        for prompt in (False, True):
            try:
                theirs = render_jinja_template(conversations=[chat], chat_template=template, add_generation_prompt=prompt)[0][0]
            except jinja2.TemplateError as exc:
                with pytest.raises(type(exc), match=str(exc)[:20]):
                    compile_chat_template(template).render(messages=chat, add_generation_prompt=prompt)
                continue
            assert compile_chat_template(template).render(messages=chat, add_generation_prompt=prompt) == theirs, (template, chat)


@pytest.mark.parametrize("escape", ["{{ ''.__class__.__mro__ }}", "{{ dict.mro() }}", "{% set ns = namespace(_x=1) %}",
                                    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}"])
def test_a_chat_template_cannot_leave_the_sandbox(escape):
    import jinja2

    from llmnb.tokenizer import compile_chat_template

    with pytest.raises((jinja2.exceptions.SecurityError, jinja2.exceptions.UndefinedError)):
        compile_chat_template(escape).render(messages=[])


def test_a_folder_tokenizer_renders_chats_without_importing_transformers():
    """transformers' chat utilities cost a server 23 MB resident (issue 23): the light tokenizer renders without them."""
    import subprocess
    import sys

    folder = resolve_model("smollm2-135m-instruct")  # resolving imports transformers: done here, not in the child
    code = ("import sys; from llmnb.tokenizer import FolderTokenizer; "
            f"ids = FolderTokenizer.open({str(folder)!r}).chat_ids([{{'role': 'user', 'content': 'hi'}}]); "
            "print(len(ids), 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n, imported = out.stdout.split()
    assert int(n) > 5 and imported == "False", out.stdout


def test_a_folder_that_autotokenizer_reads_otherwise_is_left_to_it(tmp_path):
    """Decoded text rewritten (clean_up_tokenization_spaces), or a tokenizer class of its own: AutoTokenizer's, even when light."""
    import json

    from tokenizers import Tokenizer

    from llmnb.tokenizer import FolderTokenizer, hf_tokenizer

    folder = _bpe_folder(tmp_path)
    assert isinstance(hf_tokenizer(folder, light=True), FolderTokenizer) and not isinstance(hf_tokenizer(folder), FolderTokenizer)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    for change in [{"clean_up_tokenization_spaces": True}, {"tokenizer_class": "GPT2Tokenizer"}]:
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, **change}))
        assert FolderTokenizer.open(folder) is None and not isinstance(hf_tokenizer(folder, light=True), FolderTokenizer)
    assert FolderTokenizer.open(tmp_path / "nowhere") is None
    with pytest.raises(ValueError, match="no chat template"):
        FolderTokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), {}, None).chat_ids(CHATS[0])
