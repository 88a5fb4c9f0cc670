import hashlib
import time

import pytest

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


def test_default_corpus_is_all_38_plays():
    corpus = data.load_corpus("shakespeare")
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
