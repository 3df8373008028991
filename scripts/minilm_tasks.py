"""A harder offline text task for the MiniLM benchmarks: which standard-library family a docstring
sentence comes from.

`bench_lora_minilm.make_task`'s templated sentiment sentences (the default, `--task sentiment`)
are easy enough that dense all-MiniLM-L6-v2 reaches 96-100 %, which leaves pruning nothing to
lose. `--task docstrings` is real English on every machine with Python: the first sentence of the
docstrings of the public functions, classes and methods of ten families of standard-library
modules, labelled by family (10 classes, chance 10 %):

    files          os, pathlib, shutil, glob, fnmatch, tempfile, filecmp, stat, posixpath, io, ...
    text           re, string, textwrap, difflib, unicodedata, codecs, locale, gettext, ...
    serialization  json, pickle, csv, configparser, shelve, marshal, plistlib, tomllib, sqlite3, ...
    network        email, http, urllib, smtplib, ftplib, socket, ssl, ipaddress, mimetypes
    concurrency    asyncio, threading, concurrent, multiprocessing, queue, sched, selectors
    testing        unittest, doctest, pdb, bdb, trace, timeit, cProfile, profile, pstats
    markup         xml, html, xmlrpc
    functional     collections, itertools, functools, operator, heapq, bisect, enum, ...
    math           math, cmath, decimal, fractions, statistics, random, numbers
    compression    zipfile, tarfile, gzip, bz2, lzma, zlib, zipimport

Built deterministically for a given Python version and platform: packages are walked in sorted
order (sub-modules included, private and test modules left out); a member counts only where it is
defined (`obj.__module__` is that module, so re-exports are not counted twice), methods only from
the class's own `__dict__` (no inherited docstrings); the docstring's own text (`__doc__`, never
`inspect.getdoc`'s inherited one) is cut to its first sentence, whitespace collapsed. Sentences
under `MIN_WORDS` words are dropped, duplicates within a family kept once and a sentence found in
two families dropped from both. Classes are balanced: every family keeps the same number of
sentences (the smallest family's count, after a seeded shuffle of each family's sorted list).

Split: held-out random *sentences* (not whole modules), stratified: `make_docstring_task(n_train,
n_val, seed)` shuffles each family with `seed` and takes its validation share first, then its
training share, so train and validation never share a sentence and each holds every class
`n // 10` or `n // 10 + 1` times (the first `n % 10` families one more). Asking for more than the
pool holds is an error that names the maximum.

No keras import here: the builder is cheap (about 0.2 s) and tested on its own.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import warnings

import numpy as np

FAMILIES: dict[str, tuple[str, ...]] = {
    "files": ("os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "stat",
              "posixpath", "io", "fileinput", "linecache"),
    "text": ("re", "string", "textwrap", "difflib", "unicodedata", "codecs", "locale", "gettext",
             "stringprep", "pprint", "reprlib", "base64", "binascii", "struct"),
    "serialization": ("json", "pickle", "csv", "configparser", "shelve", "marshal", "plistlib",
                      "tomllib", "copyreg", "sqlite3", "dbm", "copy", "pickletools"),
    "network": ("email", "http", "urllib", "smtplib", "ftplib", "socket", "ssl", "ipaddress",
                "mimetypes"),
    "concurrency": ("asyncio", "threading", "concurrent", "multiprocessing", "queue", "sched",
                    "selectors"),
    "testing": ("unittest", "doctest", "pdb", "bdb", "trace", "timeit", "cProfile", "profile",
                "pstats"),
    "markup": ("xml", "html", "xmlrpc"),
    "functional": ("collections", "itertools", "functools", "operator", "heapq", "bisect", "enum",
                   "dataclasses", "types"),
    "math": ("math", "cmath", "decimal", "fractions", "statistics", "random", "numbers"),
    "compression": ("zipfile", "tarfile", "gzip", "bz2", "lzma", "zlib", "zipimport"),
}  # fmt: skip
LABELS = tuple(FAMILIES)
MIN_WORDS = 4
# A sentence ends at . ! or ? followed by whitespace and a capital/quote/bracket, or at the end
# ("(i.e. the" does not end one).
_SENTENCE = re.compile(r"(.+?[.!?])(?=\s+[A-Z\"'(\[]|\s*$)")


def first_sentence(doc: str) -> str:
    """The first sentence of the docstring's first paragraph, whitespace collapsed."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = _SENTENCE.match(paragraph)
    return match.group(1) if match else paragraph


def _module_names(root: str) -> list[str]:
    """`root` and, for a package, its public sub-modules (sorted; private/test ones left out)."""
    names = [root]
    try:
        module = importlib.import_module(root)
    except ImportError:  # a family member missing on this build (e.g. no _lzma, no _ssl)
        return []
    if hasattr(module, "__path__"):
        for info in pkgutil.walk_packages(module.__path__, root + ".", onerror=lambda _: None):
            parts = info.name.split(".")
            if any(p.startswith("_") or p in ("test", "tests") for p in parts):
                continue
            names.append(info.name)
    return sorted(set(names))


def _member_docs(module) -> list[str]:
    """Own docstrings of the public functions/classes defined in `module` and of those classes'
    own public methods, in sorted name order."""
    docs = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        members = [obj]
        if inspect.isclass(obj):
            members += [v for k, v in sorted(vars(obj).items())
                        if not k.startswith("_") and inspect.isroutine(v)]  # fmt: skip
        docs += [d for m in members if isinstance(d := getattr(m, "__doc__", None), str)]
    return docs


def family_sentences() -> dict[str, list[str]]:
    """Every family's distinct sentences (sorted), with sentences found in two families dropped."""
    found: dict[str, set[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn on import
        for family, roots in FAMILIES.items():
            sentences = set()
            for root in roots:
                for name in _module_names(root):
                    try:
                        module = importlib.import_module(name)
                    except Exception:  # noqa: BLE001 - optional sub-modules (e.g. needing tkinter)
                        continue
                    for doc in _member_docs(module):
                        sentence = first_sentence(doc)
                        if len(sentence.split()) >= MIN_WORDS:
                            sentences.add(sentence)
            found[family] = sentences
    counts: dict[str, int] = {}
    for sentences in found.values():
        for s in sentences:
            counts[s] = counts.get(s, 0) + 1
    return {f: sorted(s for s in found[f] if counts[s] == 1) for f in FAMILIES}


def docstring_pool(seed: int) -> list[list[str]]:
    """Per family (in `LABELS` order) the same number of sentences, each family shuffled by
    `seed`."""
    per_family = family_sentences()
    size = min(len(s) for s in per_family.values())
    rng = np.random.default_rng(seed)
    return [[per_family[f][i] for i in rng.permutation(len(per_family[f]))[:size]]
            for f in LABELS]  # fmt: skip


def _shares(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def make_docstring_task(n_train: int, n_val: int, seed: int):
    """`((train_texts, y_train), (val_texts, y_val))`: stratified, disjoint, labels in
    `range(len(LABELS))`; both sets in a seeded random order."""
    pool = docstring_pool(seed)
    k, size = len(pool), len(pool[0])
    train_n, val_n = _shares(n_train, k), _shares(n_val, k)
    if train_n[0] + val_n[0] > size:
        most = size * k
        raise ValueError(
            f"docstrings task: {n_train} train + {n_val} val sentences need "
            f"{train_n[0] + val_n[0]} per family, but each of the {k} families has {size} "
            f"(at most {most} in all on Python here): lower --train or --val"
        )
    rng = np.random.default_rng(seed + 1)

    def take(rows):
        texts = [t for t, _ in rows]
        labels = np.array([label for _, label in rows], "int32")
        order = rng.permutation(len(rows))
        return [texts[i] for i in order], labels[order]

    val = [(s, c) for c, sentences in enumerate(pool) for s in sentences[: val_n[c]]]
    train = [(s, c) for c, sentences in enumerate(pool)
             for s in sentences[val_n[c] : val_n[c] + train_n[c]]]  # fmt: skip
    return take(train), take(val)


def task_pool_size() -> tuple[int, int]:
    """(families, sentences per family) on this Python."""
    pool = docstring_pool(0)
    return len(pool), len(pool[0])
