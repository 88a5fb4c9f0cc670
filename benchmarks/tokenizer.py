"""Tokenizer speed: our pure-Python byte-level BPE against the Rust `tokenizers` library (and tiktoken), same corpus.

Training: `llmnb.tokenizer.train_bpe` vs `tokenizers`' BpeTrainer with the same GPT-2 split regex,
byte-level alphabet, vocabulary size and special token. Encoding: the corpus's documents, ours one by one and
`tokenizers` as a batch (its parallel path), each with its own trained tokenizer, and with GPT-2's vocabulary against tiktoken. Throughput in
MB of UTF-8 text per second; the last column is ours / reference.

    python benchmarks/tokenizer.py
    python benchmarks/tokenizer.py --vocab 1024,8192
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from llmnb import assets, hardware  # noqa: E402
from llmnb.data import load_corpus  # noqa: E402
from llmnb.tokenizer import ENDOFTEXT, GPT2_SPLIT, BPETokenizer, train_bpe  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def rust_bpe(docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="1024,4096,16384")
    args = parser.parse_args()
    corpus = load_corpus("shakespeare")
    docs = [d.text for d in corpus.documents]
    text = corpus.text
    mb = len(text.encode()) / 1e6
    info = hardware.machine_info()
    print(f"# {time.strftime('%Y-%m-%d')} on {info.cpu}, {info.cores} cores; corpus 'shakespeare', {mb:.2f} MB, {len(docs)} documents; "
          f"tokenizers {info.libraries['tokenizers']}\n")
    print("| what | vocab | ours (MB/s) | reference | reference (MB/s) | ours bytes/token | reference bytes/token | ours / reference |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for vocab in [int(v) for v in args.vocab.split(",")]:
        ours, t_ours = timed(lambda: train_bpe(docs, vocab, GPT2_SPLIT))
        theirs, t_theirs = timed(lambda: rust_bpe(docs, vocab))
        print(f"| train | {vocab} | {mb / t_ours:.2f} | tokenizers BpeTrainer | {mb / t_theirs:.2f} | | | {t_theirs / t_ours:.2f} |", flush=True)
        pieces = [d + "\n\n" for d in docs]  # the documents as tokenizers is used: a batch (its parallel path)
        fresh = BPETokenizer(ours.merges, None, GPT2_SPLIT, ours.special_tokens)  # cold chunk cache
        ids, t_ours = timed(lambda: [i for piece in pieces for i in fresh.encode_ordinary(piece)])
        batch, t_theirs = timed(lambda: theirs.encode_batch(pieces))
        ref = [i for e in batch for i in e.ids]
        print(f"| encode, each its own merges | {vocab} | {mb / t_ours:.2f} | tokenizers encode_batch | {mb / t_theirs:.2f} | {len(text.encode()) / len(ids):.2f} | "
              f"{len(text.encode()) / len(ref):.2f} | {t_theirs / t_ours:.2f} |", flush=True)
    files = assets.gpt2_vocab_files()
    gpt2 = BPETokenizer.from_gpt2_files(files["encoder.json"], files["vocab.bpe"])
    tk = assets.tiktoken_encoding("gpt2")
    ids, t_ours = timed(lambda: gpt2.encode_ordinary(text))
    ref, t_theirs = timed(lambda: tk.encode_ordinary(text))
    assert ids == ref, "GPT-2 ids differ from tiktoken's"
    print(f"| encode, GPT-2 vocab (ids identical) | 50257 | {mb / t_ours:.2f} | tiktoken | {mb / t_theirs:.2f} | {len(text.encode()) / len(ids):.2f} | "
          f"{len(text.encode()) / len(ref):.2f} | {t_theirs / t_ours:.2f} |")


if __name__ == "__main__":
    main()
