#!/usr/bin/env python3
"""clip_vocab.py — rebuild CLIP's tokenizer files from its public BPE list.

CLIP's vocabulary is not part of this project; it is derived from the merges
list `bpe_simple_vocab_16e6.txt.gz` that CLIP published (shipped inside the
open_clip_torch wheel on PyPI).  This script turns that list into the files a
diffusers `tokenizer/` folder carries, in the layout Hugging Face writes:

  vocab.json      token -> id, ids in order (one line, no trailing newline)
  merges.txt      "#version: 0.2" then one "left right" merge per line
  tokenizer.json  the fast-tokenizer file (normalizer, pre-tokenizer, BPE model)

CLIP's vocabulary: the 256 byte characters, the same with "</w>" appended,
one token per merge (the merges are lines 1 .. 48894 of the list), then
<|startoftext|> and <|endoftext|>: 49408 tokens.

Standard library only.  Usage:
  clip_vocab.py --wheel open_clip_torch-X.whl OUT_DIR [OUT_DIR ...]
  clip_vocab.py --bpe bpe_simple_vocab_16e6.txt.gz OUT_DIR [OUT_DIR ...]
"""
import argparse
import gzip
import hashlib
import json
import os
import sys
import tempfile
import zipfile

BPE_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
N_SPECIAL = 2
N_MERGES = VOCAB_SIZE - 2 * 256 - N_SPECIAL   # 48894
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# MD5 of the files Hugging Face ships for CLIP (openai/clip-vit-large-patch14,
# the SD 1.x tokenizer): what we write must match them byte for byte.
EXPECTED_MD5 = {"vocab.json": "1bc8fc969ae774adc01b561fedad5638",
                "merges.txt": "d2bc10797e70c920c14c69729ecdab34"}


def byte_chars():
    """The byte-level alphabet of GPT-2/CLIP: byte b -> one printable char.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls,
    space, DEL, NBSP, soft hyphen) take code points 256, 257, ... in byte
    order, so every byte string becomes a string without whitespace or
    control characters.  Returned in vocabulary order: the self-mapped bytes
    first, then the shifted ones."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
            + list(range(0xAE, 0xFF + 1)))
    chars = [chr(b) for b in keep]
    shifted = [b for b in range(256) if b not in keep]
    return chars + [chr(256 + i) for i in range(len(shifted))]


def read_merges(bpe_gz_bytes):
    lines = gzip.decompress(bpe_gz_bytes).decode("utf-8").split("\n")
    # Line 0 is a header; CLIP keeps exactly the first N_MERGES merges after it.
    merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        sys.exit("clip_vocab: the BPE list does not look like CLIP's "
                 "(expected %d two-token merge lines)" % N_MERGES)
    return merges


def build(merges):
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != VOCAB_SIZE:
        sys.exit("clip_vocab: %d distinct tokens, expected %d" % (len(vocab), VOCAB_SIZE))
    return vocab


def added_token(tid, content):
    return {"id": tid, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


def tokenizer_json(vocab, merges):
    split_regex = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                   r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    return {
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 77, "strategy": "LongestFirst",
                       "stride": 0},
        "padding": {"strategy": {"Fixed": 77}, "direction": "Right", "pad_to_multiple_of": None,
                    "pad_id": vocab[EOS], "pad_type_id": 0, "pad_token": EOS},
        "added_tokens": [added_token(vocab[BOS], BOS), added_token(vocab[EOS], EOS)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split_regex}, "behavior": "Removed",
             "invert": True},
            byte_level]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOS, vocab[EOS]],
                           "cls": [BOS, vocab[BOS]], "trim_offsets": False,
                           "add_prefix_space": False},
        "decoder": dict(byte_level, add_prefix_space=True),
        "model": {"type": "BPE", "dropout": None, "unk_token": EOS,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }


def write_atomic(path, text):
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", help="open_clip_torch wheel holding " + BPE_IN_WHEEL)
    src.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz itself")
    ap.add_argument("out_dirs", nargs="+")
    args = ap.parse_args()

    if args.wheel:
        with zipfile.ZipFile(args.wheel) as z:
            raw = z.read(BPE_IN_WHEEL)
    else:
        with open(args.bpe, "rb") as f:
            raw = f.read()
    merges = read_merges(raw)
    vocab = build(merges)

    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges),
        "tokenizer.json": json.dumps(tokenizer_json(vocab, merges), indent=2, ensure_ascii=False),
    }
    for name, md5 in EXPECTED_MD5.items():
        got = hashlib.md5(files[name].encode("utf-8")).hexdigest()
        if got != md5:
            sys.exit("clip_vocab: built %s has md5 %s, expected %s" % (name, got, md5))
    for d in args.out_dirs:
        os.makedirs(d, exist_ok=True)
        for name, text in files.items():
            write_atomic(os.path.join(d, name), text)


if __name__ == "__main__":
    main()
