"""The RWKV World tokenizer: ours against BlinkDL's TRIE_TOKENIZER (PyPI `rwkv`).

    .venv/bin/python -m benchmarks.world_tokenizer [--megabytes 1] [--rounds 3]

(as a module: run as a file, benchmarks/rwkv.py would shadow the `rwkv` package).

On the same text (the bundled stdlib docstrings, this package's Python
source, and CJK / emoji lines, cut to ``--megabytes`` MB of UTF-8), times
loading the vocabulary, the first encode (ours compiles its per-prefix
patterns then) and the median of ``--rounds`` warm encodes, and checks that
the ids agree.
"""

from __future__ import annotations

import argparse
import importlib.resources
import pathlib
import statistics
import time

from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from recurrent_lm.world_tokenizer import WorldTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def sample_text(size: int) -> bytes:
    prose = (ROOT / "recurrent_lm" / "data" / "stdlib_docstrings.txt").read_text(
        "utf-8"
    )
    code = "".join(
        p.read_text("utf-8") for p in sorted((ROOT / "recurrent_lm").rglob("*.py"))
    )
    cjk = "日本語のテキストです。中文文本，繁體中文。한국어 텍스트. 👨‍👩‍👧 😀\n" * 4000
    third = size // 3
    text = prose[:third] + code[:third] + cjk
    return text.encode()[:size].decode("utf-8", "ignore").encode()


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    vocab = str(importlib.resources.files("rwkv") / "rwkv_vocab_v20230424.txt")
    data = sample_text(int(args.megabytes * 1_000_000))
    print(f"{len(data):,} bytes")
    ours, ours_load = timed(WorldTokenizer.load, vocab)
    theirs, theirs_load = timed(TRIE_TOKENIZER, vocab)
    ids, ours_first = timed(ours.encode_bytes, data)
    reference, theirs_first = timed(theirs.encodeBytes, data)
    assert ids == reference, "the ids differ"
    warm = {"ours": [], "theirs": []}
    for _ in range(args.rounds):
        warm["ours"].append(timed(ours.encode_bytes, data)[1])
        warm["theirs"].append(timed(theirs.encodeBytes, data)[1])
    print(f"{len(ids):,} tokens, identical")
    print(f"{'':8}{'load':>8}{'first':>8}{'warm':>8}  (s)")
    for name, load, first in (
        ("ours", ours_load, ours_first),
        ("theirs", theirs_load, theirs_first),
    ):
        print(f"{name:8}{load:8.2f}{first:8.2f}{statistics.median(warm[name]):8.2f}")


if __name__ == "__main__":
    main()
