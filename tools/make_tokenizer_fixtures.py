#!/usr/bin/env python3
"""Reference token ids for the tokenizer tests, from Hugging Face `tokenizers` (the reference
implementation). Needs only the `tokenizers` package (and the standard library), so it runs where
that is installed (the GPU machine), not in CI; its small outputs are committed.

    python3 tools/make_tokenizer_fixtures.py [--out DIR] [--strings FILE] NAME=TOKENIZER_JSON ...

e.g. (after scripts/fetch-tokenizers.sh):

    python3 tools/make_tokenizer_fixtures.py --out tests/fixtures/tokenizer \\
        qwen3=.cache/tokenizers/qwen3/tokenizer.json \\
        qwen35re=.cache/tokenizers/qwen35-regex/tokenizer.json

Reads --strings (default tests/fixtures/tokenizer/strings.jsonl: one JSON string per line) and
writes, for each NAME, into --out (default tests/fixtures/tokenizer):

  NAME.ids.jsonl     one JSON array per string: Tokenizer.encode(text).ids (default
                     add_special_tokens=True; added tokens such as <|im_start|> are matched)
  NAME.plain.jsonl   one JSON array per string: the ids with no added-token matching at all
                     (normalizer -> pre-tokenizer -> model on the whole text), which is what
                     fm_tokenizer_encode(..., allow_special=false) must give
  NAME.pieces.jsonl  one JSON array of strings per string: the pre-tokenizer's pieces of the
                     normalized text (the regex split, checked apart from BPE)
  NAME.decode.jsonl  {"ids": [...], "text": decode(ids, skip_special_tokens=False)} per line: the
                     ids of every string (windows of the long ones), prefixes and suffixes that cut
                     characters apart, and seeded random id sequences (invalid UTF-8 -> U+FFFD)
  NAME.meta.json     tokenizers version, the tokenizer file's sha256 and size, vocab size, counts
"""
import argparse
import hashlib
import json
import os
import random
import sys

import tokenizers
from tokenizers import Tokenizer


def pieces(tok, text, byte_of):
    """The pre-tokenizer's pieces of the normalized text, as text (ByteLevel's mapping undone)."""
    norm = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
    out = []
    for p, _ in tok.pre_tokenizer.pre_tokenize_str(norm):
        out.append(bytes(byte_of[c] for c in p).decode("utf-8"))
    return out


def plain_ids(tok, text):
    """Ids without added-token matching: normalizer, pre-tokenizer and model on the whole text."""
    norm = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
    if tok.pre_tokenizer is not None:
        parts = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(norm)]
    else:
        parts = [norm]
    ids = []
    for p in parts:
        ids.extend(t.id for t in tok.model.tokenize(p))
    return ids


def gpt2_byte_chars():
    """Element b: the character that stands for byte b."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    by_byte = {b: chr(b) for b in bs}
    n = 0
    for b in range(256):
        if b not in by_byte:
            by_byte[b] = chr(256 + n)
            n += 1
    return [by_byte[b] for b in range(256)]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/tokenizer")
    ap.add_argument("--strings", default="tests/fixtures/tokenizer/strings.jsonl")
    ap.add_argument("specs", nargs="+", metavar="NAME=TOKENIZER_JSON")
    args = ap.parse_args()

    with open(args.strings, encoding="utf-8") as f:
        strings = [json.loads(line) for line in f if line.strip()]
    os.makedirs(args.out, exist_ok=True)

    for spec in args.specs:
        if "=" not in spec:
            sys.exit(f"make_tokenizer_fixtures: expected NAME=PATH, got {spec!r}")
        name, path = spec.split("=", 1)
        with open(path, "rb") as f:
            raw = f.read()
        tok = Tokenizer.from_file(path)
        n_vocab = tok.get_vocab_size(with_added_tokens=True)

        ids = [tok.encode(s).ids for s in strings]
        plain = [plain_ids(tok, s) for s in strings]
        byte_of = {c: b for b, c in enumerate(gpt2_byte_chars())}
        split = [pieces(tok, s, byte_of) for s in strings]

        rnd = random.Random(20261121)
        dec_ids = []
        for seq in ids:
            if len(seq) > 64:  # long ones: windows that start and end anywhere (keeps the file small)
                for _ in range(3):
                    k = rnd.randint(0, len(seq) - 48)
                    dec_ids.append(seq[k:k + 48])
                continue
            if seq:
                dec_ids.append(seq)
            if len(seq) >= 2:
                k = rnd.randint(1, len(seq) - 1)
                dec_ids.append(seq[:k])
                dec_ids.append(seq[k:])
        byte_ids = [tok.token_to_id(c) for c in gpt2_byte_chars()]  # the 256 single-byte tokens
        byte_ids = [i for i in byte_ids if i is not None]
        for _ in range(300):
            n = rnd.randint(1, 8)
            seq = []
            for _ in range(n):
                seq.append(rnd.choice(byte_ids) if byte_ids and rnd.random() < 0.6 else rnd.randrange(n_vocab))
            dec_ids.append(seq)
        decode = [{"ids": s, "text": tok.decode(s, skip_special_tokens=False)} for s in dec_ids]

        write_jsonl(os.path.join(args.out, f"{name}.ids.jsonl"), ids)
        write_jsonl(os.path.join(args.out, f"{name}.plain.jsonl"), plain)
        write_jsonl(os.path.join(args.out, f"{name}.pieces.jsonl"), split)
        write_jsonl(os.path.join(args.out, f"{name}.decode.jsonl"), decode)
        meta = {
            "tokenizers_version": tokenizers.__version__,
            "tokenizer_json": os.path.basename(os.path.dirname(os.path.abspath(path))) + "/" + os.path.basename(path),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "size": len(raw),
            "n_vocab": n_vocab,
            "n_strings": len(strings),
            "n_decode": len(decode),
        }
        with open(os.path.join(args.out, f"{name}.meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        print(f"{name}: {len(strings)} strings, {sum(map(len, ids))} ids, {len(decode)} decode checks "
              f"(tokenizers {tokenizers.__version__})")


if __name__ == "__main__":
    main()
