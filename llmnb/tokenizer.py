"""Byte-level BPE from scratch, and a character-level tokenizer behind the same interface.

In the spirit of minbpe: text is split into chunks by a regex (GPT-2's or GPT-4's), each
chunk's UTF-8 bytes start as one token each, and learned merges join adjacent pairs,
lowest rank first. Any byte string decodes exactly and any text encodes, since every
byte is a token. The same `BPETokenizer` loads GPT-2's `encoder.json`/`vocab.bpe` and
Hugging Face `tokenizer.json` BPE files (ids identical to tiktoken and transformers),
and exports a `tokenizer.json` that `transformers.PreTrainedTokenizerFast` loads.

Training updates pair counts incrementally: a merge only revisits the chunks that
contain the merged pair, instead of recounting the corpus.
"""
from __future__ import annotations

import datetime
import functools
import heapq
import io
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import jinja2.ext
import jinja2.sandbox
import regex
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .paths import write_atomic

if TYPE_CHECKING:
    import sentencepiece

GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_SPLIT = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (used in vocab files and tokenizer.json)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of `text`; lone surrogates from undecodable bytes (surrogateescape) become those bytes again."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates: keep their (invalid) UTF-8 form rather than fail
        return text.encode("utf-8", errors="surrogatepass")


def _merge(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids`, left to right, by `new`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class BPETokenizer:
    """Byte-level BPE: `merges` maps a pair of token ids to the merged id, in rank order."""

    def __init__(self, merges: dict[tuple[int, int], int], byte_ids: list[int | None] | None = None, pattern: str | None = GPT4_SPLIT,
                 special_tokens: dict[str, int] | None = None):
        # token id of each byte value; None for a byte a loaded vocabulary lacks (dropped, as Hugging Face does)
        self.byte_ids = byte_ids or list(range(256))
        self.merges = dict(merges)
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.pattern = pattern
        self.compiled = regex.compile(pattern) if pattern else None
        self.special_tokens = dict(special_tokens or {})
        self.vocab: dict[int, bytes] = {tid: bytes([b]) for b, tid in enumerate(self.byte_ids) if tid is not None}
        for (a, b), new in self.merges.items():
            self.vocab[new] = self.vocab[a] + self.vocab[b]
        self.special_ids = {i: s for s, i in self.special_tokens.items()}
        self._cache: dict[bytes, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return max([*self.vocab, *self.special_ids]) + 1

    # --- encoding ----------------------------------------------------------------------------

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        if (cached := self._cache.get(chunk)) is not None:
            return cached
        ids = [self.byte_ids[b] for b in chunk if self.byte_ids[b] is not None]
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            ids = _merge(ids, pair, self.merges[pair])
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, treating special-token strings as plain text."""
        chunks = self.compiled.findall(text) if self.compiled else [text]
        ids: list[int] = []
        for chunk in chunks:
            ids.extend(self._encode_chunk(_utf8(chunk)))
        return ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of arbitrary bytes, valid UTF-8 or not; `decode_bytes` gives them back exactly."""
        return self.encode_ordinary(data.decode("utf-8", errors="surrogateescape"))

    def encode(self, text: str, allowed_special: str | Iterable[str] = ()) -> list[int]:
        """Token ids of `text`; special-token strings in `allowed_special` (or "all") become their ids."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"unknown special tokens {sorted(unknown)}; this tokenizer has {sorted(self.special_tokens)}")
        if not allowed:
            return self.encode_ordinary(text)
        splitter = "(" + "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for part in regex.split(splitter, text):
            ids.extend([self.special_tokens[part]] if part in allowed else self.encode_ordinary(part))
        return ids

    # --- decoding ----------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = []
        for i in ids:
            if i in self.vocab:
                out.append(self.vocab[i])
            elif i in self.special_ids:
                out.append(self.special_ids[i].encode())
            else:
                raise ValueError(f"token id {i} is not in this tokenizer's vocabulary (size {self.vocab_size})")
        return b"".join(out)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD (errors='replace')."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each token's text on its own, for showing token boundaries."""
        return [self.decode([i]) for i in ids]

    # --- persistence ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        return _save_json(path, "llmnb-bpe", {"version": 1, "pattern": self.pattern, "byte_ids": self.byte_ids,
                                              "merges": [[a, b, new] for (a, b), new in self.merges.items()], "special_tokens": self.special_tokens})

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        data = _load_json(path, "llmnb-bpe", "an llmnb BPE file; for a Hugging Face tokenizer.json use BPETokenizer.from_hf_json")
        return cls({(a, b): new for a, b, new in data["merges"]}, data["byte_ids"], data["pattern"], data["special_tokens"])

    @classmethod
    def from_vocab_and_merges(cls, vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str = GPT2_SPLIT,
                              special_tokens: dict[str, int] | None = None) -> BPETokenizer:
        """From byte-level strings (GPT-2's printable byte alphabet), as in vocab.json/merges.txt and tokenizer.json."""
        to_char = byte_to_unicode()
        byte_ids = [vocab.get(to_char[b]) for b in range(256)]
        table = {}
        for left, right in merges:
            if left + right in vocab:
                table[(vocab[left], vocab[right])] = vocab[left + right]
        return cls(table, byte_ids, pattern, special_tokens)

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> BPETokenizer:
        """GPT-2's tokenizer from OpenAI's `encoder.json` and `vocab.bpe`."""
        vocab = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split(" ")) for line in lines[1:] if line and not line.startswith("#version")]
        specials = {ENDOFTEXT: vocab[ENDOFTEXT]}
        return cls.from_vocab_and_merges({k: v for k, v in vocab.items() if k != ENDOFTEXT}, merges, GPT2_SPLIT, specials)

    @classmethod
    def from_hf_json(cls, path: str | Path) -> BPETokenizer:
        """A Hugging Face `tokenizer.json` with a byte-level BPE model (GPT-2, SmolLM2, Llama-3 style)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type") != "BPE" or model.get("byte_fallback") or data.get("normalizer"):
            raise ValueError(f"{path}: only byte-level BPE without a normalizer or byte fallback can be loaded")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        pattern = _hf_pattern(data["pre_tokenizer"])
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        return cls.from_vocab_and_merges(model["vocab"], merges, pattern, specials)

    def to_hf_json(self, path: str | Path) -> Path:
        """Write a `tokenizer.json` that `tokenizers` and `PreTrainedTokenizerFast` load and encode identically."""
        to_char = byte_to_unicode()

        def text(i: int) -> str:
            return "".join(to_char[b] for b in self.vocab[i])

        vocab = {text(i): i for i in self.vocab}
        if len(vocab) != len(self.vocab):
            raise ValueError("two token ids share the same bytes; tokenizer.json cannot express that")
        merges = [(text(a), text(b)) for (a, b) in self.merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        steps = [pre_tokenizers.Split(Regex(self.pattern), behavior="isolated")] if self.pattern else []
        tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()

        for content, _ in sorted(self.special_tokens.items(), key=lambda kv: kv[1]):
            tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        added = {content: tok.token_to_id(content) for content in self.special_tokens}
        if added != self.special_tokens:
            raise ValueError(f"special tokens need ids right after the vocabulary to export; got {added}, have {self.special_tokens}")
        return write_atomic(path, lambda tmp: tok.save(str(tmp)))


def _hf_pattern(pre_tokenizer: dict | None) -> str:
    """The split regex of a byte-level pre-tokenizer: GPT-2's built-in one, or an explicit Split."""
    if pre_tokenizer is None:
        raise ValueError("tokenizer.json has no pre-tokenizer; expected a ByteLevel one")
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    pattern = None
    for step in steps:
        if step["type"] == "Split":
            pattern = step["pattern"].get("Regex") or regex.escape(step["pattern"]["String"])
        elif step["type"] == "ByteLevel":
            if step.get("add_prefix_space"):
                raise ValueError("ByteLevel with add_prefix_space is not supported")
            if step.get("use_regex", True):
                pattern = pattern or GPT2_SPLIT
        else:
            raise ValueError(f"pre-tokenizer step {step['type']!r} is not supported")
    return pattern


def train_bpe(texts: str | Iterable[str], vocab_size: int, pattern: str | None = GPT4_SPLIT,
              special_tokens: Iterable[str] = (ENDOFTEXT,)) -> BPETokenizer:
    """Learn merges until the vocabulary (256 bytes + merges + special tokens) reaches `vocab_size`.

    Counts each distinct chunk once with its frequency, and after each merge updates the
    pair counts of only the chunks that contained the merged pair. Ties go to the
    smallest pair of ids, so training is deterministic.
    """
    specials = list(dict.fromkeys(special_tokens))
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be at least 256 bytes + {len(specials)} special tokens = {256 + len(specials)}, got {vocab_size}")
    compiled = regex.compile(pattern) if pattern else None
    chunk_counts: Counter[bytes] = Counter()
    for text in [texts] if isinstance(texts, str) else texts:
        chunk_counts.update(_utf8(c) for c in (compiled.findall(text) if compiled else [text]))
    words = [list(chunk) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (ids, count) in enumerate(zip(words, counts)):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += count
            where[pair].add(w)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    vocab = {i: bytes([i]) for i in range(256)}
    by_bytes = {b: i for i, b in vocab.items()}
    merges: dict[tuple[int, int], int] = {}
    target = vocab_size - len(specials)
    while len(vocab) < target and heap:
        negative, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count <= 0:
            continue
        if -negative != count:  # stale entry: the count changed since it was pushed
            heapq.heappush(heap, (-count, pair))
            continue
        merged = vocab[pair[0]] + vocab[pair[1]]
        new = by_bytes.get(merged)
        if new is None:  # the same bytes can arise from two different pairs: one token for both
            new = len(vocab)
            vocab[new], by_bytes[merged] = merged, new
        merges[pair] = new
        touched = set()
        for w in where.pop(pair):
            ids, c = words[w], counts[w]
            for p in zip(ids, ids[1:]):
                pair_counts[p] -= c
            ids = words[w] = _merge(ids, pair, new)
            for p in zip(ids, ids[1:]):
                pair_counts[p] += c
                where[p].add(w)
                touched.add(p)
        pair_counts.pop(pair, None)
        for p in touched:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    special_ids = {s: len(vocab) + i for i, s in enumerate(specials)}
    return BPETokenizer(merges, None, pattern, special_ids)


class CharTokenizer:
    """One token per character, as in nanoGPT's Shakespeare example; the vocabulary is the corpus's characters."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - set(self.index))
            raise ValueError(f"characters {unknown[:10]} are not in this character vocabulary; train it on text that has them") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, path: str | Path) -> Path:
        return _save_json(path, "llmnb-char", {"chars": self.chars})

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        return cls(_load_json(path, "llmnb-char", "an llmnb character tokenizer file")["chars"])


class FolderTokenizer:
    """A Hugging Face tokenizer folder read with `tokenizers`, its chat template rendered by `compile_chat_template`.

    What a server asks of a tokenizer (encode, decode, a chat's prompt ids, the end token) without `AutoTokenizer`,
    whose import chain (transformers' tokenizer classes import its kernel and accelerate integrations) cost a server
    37 MB more than this on an int8 folder (benchmarks/README.md, issue 23). `open` gives None for a folder that
    `AutoTokenizer` would read otherwise; tests/test_tokenizer.py checks that both give the same ids and text.
    """
    PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")  # classes that use tokenizer.json as it is

    def __init__(self, backend: Tokenizer, settings: dict, chat_template: str | None):
        self.backend, self.chat_template = backend, chat_template
        # the template sees the special tokens by name, as transformers passes them to it
        self.special = {k: v["content"] if isinstance(v, dict) else v for k, v in settings.items()
                        if k.endswith("_token") and isinstance(v, (str, dict)) and v}
        self.eos_token_id = backend.token_to_id(self.special["eos_token"]) if "eos_token" in self.special else None

    @classmethod
    def open(cls, folder: str | Path) -> FolderTokenizer | None:
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file() or not (folder / "tokenizer_config.json").is_file():
            return None
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        template_file = folder / "chat_template.jinja"  # transformers' own file; an older folder keeps it in the settings
        template = template_file.read_text() if template_file.is_file() else settings.get("chat_template")
        if settings.get("tokenizer_class") not in cls.PLAIN_CLASSES or settings.get("clean_up_tokenization_spaces") \
                or not isinstance(template, (str, type(None))):
            return None  # a class of its own, decoded text rewritten, or several named templates: AutoTokenizer's work
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), settings, template)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The prompt's ids for a chat, as `apply_chat_template(..., tokenize=True)`: the template writes the special tokens."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template: format the prompt yourself, or use a model folder that has one")
        text = compile_chat_template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        return self.backend.encode(text, add_special_tokens=False).ids


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks the assistant's text for its training masks with
    it): here the block renders as its body, which is all a prompt needs."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` without underscore names: a template from the hub is untrusted code, and a namespace that stores
    `__class__`-like names is a known way out of the sandbox (what transformers refuses too)."""

    def __init__(*args, **kwargs):  # Namespace's own signature trick, so that namespace(self=...) still works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot store {name!r} on a namespace: rename it without the underscore")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` in a template, without the type itself (whose `mro()` leads to `object`)."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers' `apply_chat_template` compiles it: jinja2's sandbox (templates from the
    hub are untrusted code), blocks trimmed, `break`/`continue`, `tojson` without HTML escaping, `raise_exception`,
    `strftime_now`. Without importing transformers, whose utilities cost a server 23 MB (issue 23); the ids are
    checked against its own in tests/test_tokenizer.py."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace, dict=_Dict(),
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(source)


def hf_tokenizer(folder: str | Path, light: bool = False):
    """`AutoTokenizer` for a Hugging Face folder or hub id; with `light`, a `FolderTokenizer` where it reads the folder the same way."""
    if light and (found := FolderTokenizer.open(folder)) is not None:
        return found
    from transformers import AutoTokenizer  # seconds to import: only where a Hugging Face object is built

    return AutoTokenizer.from_pretrained(folder)


# Llama 2's trainer settings: text kept as it is (no NFKC, no collapsed spaces), digits one by one, and characters the
# vocabulary lacks spelled as their UTF-8 bytes instead of <unk>.
SENTENCEPIECE_LLAMA = dict(normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                           allow_whitespace_only_pieces=True, character_coverage=1.0)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = "unigram", byte_fallback: bool = True
                        ) -> "sentencepiece.SentencePieceProcessor":
    """A SentencePiece tokenizer (Kudo & Richardson 2018: https://arxiv.org/abs/1808.06226) trained in memory on `texts`.

    `unigram` (T5, ALBERT, XLNet) starts from many candidate pieces and drops those whose removal costs the corpus
    likelihood least; `bpe` (Llama 1-2, Mistral, Gemma) merges pairs as our BPE does, but over characters of text in
    which spaces are the visible piece "▁", with no regex split first. `byte_fallback`: unseen characters become
    byte pieces, so any text round-trips; without it they become <unk> and are lost.
    """
    import sentencepiece  # the notebooks extra: notebook 01's comparison only

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    lines = (line for text in texts for line in text.splitlines() if line.strip())  # SentencePiece reads sentences, not documents
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type=model_type,
                                             byte_fallback=byte_fallback, minloglevel=2, **SENTENCEPIECE_LLAMA)
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def _save_json(path: str | Path, kind: str, payload: dict) -> Path:
    """Write a tokenizer file tagged with its kind, so that loading the wrong kind fails clearly."""
    text = json.dumps({"type": kind, **payload})
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _load_json(path: str | Path, kind: str, what: str) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("type") != kind:
        raise ValueError(f"{path} is not {what}")
    return data
