"""Extracts the bundled training corpus: docstrings of the Python standard library.

    python scripts/build_stdlib_corpus.py [--max-bytes 2000000]

Reads the ``.py`` files of the running interpreter's standard library (no
download), takes every module, class and function docstring of at least
``--min-chars`` characters that reads like prose, cleans its indentation
(`inspect.cleandoc`), and writes them, one document each, separated by two empty
lines, to ``recurrent_lm/data/stdlib_docstrings.txt``, plus the Python licence
(PSF) as ``recurrent_lm/data/stdlib_docstrings.LICENSE.txt``. Files are read in
sorted order, so the output depends only on the Python version.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import re
import shutil
import sys
import sysconfig

SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
    "__pycache__",
    "config-3.11-x86_64-linux-gnu",
    "tkinter",
}
OUT = os.path.join(os.path.dirname(__file__), "..", "recurrent_lm", "data")


def docstrings(path: str):
    with open(path, encoding="utf-8", errors="replace") as f:
        try:
            tree = ast.parse(f.read())
        except SyntaxError:
            return
    for node in ast.walk(tree):
        if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        ):
            text = ast.get_docstring(node, clean=False)
            if text:
                yield inspect.cleandoc(text)


def is_prose(text: str) -> bool:
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters / len(text) > 0.8 and not text.lstrip().startswith((">>>", "$", "%"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-bytes", type=int, default=2_000_000)
    parser.add_argument("--min-chars", type=int, default=160)
    args = parser.parse_args()
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
    documents, size, seen = [], 0, set()
    for path in sorted(files):
        for text in docstrings(path):
            text = re.sub(r"\n{3,}", "\n\n", text.strip())
            if len(text) < args.min_chars or text in seen or not is_prose(text):
                continue
            seen.add(text)
            if size + len(text.encode()) + 3 > args.max_bytes:
                break
            documents.append(text)
            size += len(text.encode()) + 3
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "stdlib_docstrings.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n\n".join(documents) + "\n")
    shutil.copyfile(
        os.path.join(stdlib, "LICENSE.txt"),
        os.path.join(OUT, "stdlib_docstrings.LICENSE.txt"),
    )
    print(
        f"{len(documents)} docstrings, {size} bytes, from {len(files)} files of Python"
        f" {sys.version.split()[0]} ({stdlib})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
