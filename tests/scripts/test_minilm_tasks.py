"""scripts/minilm_tasks.py: the stdlib-docstring task builder (no MiniLM weights, well under 1 s),
and bench_lora_minilm's task dispatch."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests._scripts import SCRIPTS, load_script


@pytest.fixture(scope="module")
def tasks():
    return load_script("minilm_tasks")


@pytest.mark.parametrize(
    ("doc", "want"),
    [
        ("Return the path.  More text here.", "Return the path."),
        (
            "\n    Sniff the format (i.e. the\n    dialect) of a file.\n\n    Details.",
            "Sniff the format (i.e. the dialect) of a file.",
        ),
        ("No full stop at all", "No full stop at all"),
        ("Is it? Yes.", "Is it?"),
        ("First paragraph only\n\nSecond. Paragraph.", "First paragraph only"),
    ],
    ids=["two-sentences", "abbreviation-and-newlines", "no-stop", "question", "paragraph"],
)
def test_first_sentence(tasks, doc, want):
    assert tasks.first_sentence(doc) == want


def test_families_are_disjoint_and_large_enough(tasks):
    per_family = tasks.family_sentences()
    assert list(per_family) == list(tasks.LABELS)
    seen: dict[str, str] = {}
    for family, sentences in per_family.items():
        assert len(sentences) >= 100, family  # 139+ each on CPython 3.11
        assert sentences == sorted(set(sentences))
        for s in sentences:
            assert len(s.split()) >= tasks.MIN_WORDS
            assert s not in seen, f"{s!r} in {family} and {seen.get(s)}"
            seen[s] = family


@pytest.mark.parametrize(("n_train", "n_val"), [(960, 400), (512, 123)], ids=["even", "uneven"])
def test_split_is_balanced_disjoint_and_deterministic(tasks, n_train, n_val):
    (train, y_train), (val, y_val) = tasks.make_docstring_task(n_train, n_val, seed=0)
    k = len(tasks.LABELS)
    assert (len(train), len(val)) == (n_train, n_val)
    for y, n in ((y_train, n_train), (y_val, n_val)):
        assert y.dtype == np.int32
        assert y.min() >= 0 and y.max() < k
        counts = np.bincount(y, minlength=k)
        assert counts.max() - counts.min() <= (0 if n % k == 0 else 1)
        assert counts.sum() == n
    assert not set(train) & set(val)
    assert len(set(train)) == n_train and len(set(val)) == n_val
    (train2, y_train2), (val2, y_val2) = tasks.make_docstring_task(n_train, n_val, seed=0)
    assert train2 == train and val2 == val
    np.testing.assert_array_equal(y_train2, y_train)
    np.testing.assert_array_equal(y_val2, y_val)
    (_, _), (val_other, _) = tasks.make_docstring_task(n_train, n_val, seed=1)
    assert set(val_other) != set(val)


def test_labels_follow_the_family(tasks):
    per_family = tasks.family_sentences()
    (train, y_train), _ = tasks.make_docstring_task(200, 50, seed=3)
    for text, label in zip(train, y_train, strict=True):
        assert text in per_family[tasks.LABELS[label]]


def test_asking_for_more_than_the_pool_names_the_maximum(tasks):
    k, size = tasks.task_pool_size()
    with pytest.raises(ValueError, match=rf"at most {k * size} in all"):
        tasks.make_docstring_task(k * size, k, seed=0)


def test_bench_lora_dispatches_tasks():
    sys.path.insert(0, str(SCRIPTS))
    try:
        bench = load_script("bench_lora_minilm")
    finally:
        sys.path.remove(str(SCRIPTS))
    assert bench.task_classes("sentiment") == 2
    assert bench.task_classes("docstrings") == 10
    (texts, labels), _ = bench.task_texts(16, 8, 0)  # the default stays the templated task
    (want, want_labels), _ = bench.make_task(16, 8, 0)
    assert texts == want
    np.testing.assert_array_equal(labels, want_labels)
    (_, labels), (_, val_labels) = bench.task_texts(40, 20, 0, "docstrings")
    assert set(labels.tolist()) == set(range(10)) and len(val_labels) == 20
    with pytest.raises(ValueError, match="unknown task 'nope'.*sentiment, docstrings"):
        bench.task_texts(4, 4, 0, "nope")
