"""docs/extending.md: every Python block runs as written (in order, one namespace per block)."""

from __future__ import annotations

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_both_worked_examples():
    assert len(BLOCKS) == 2
    assert "def get_prunable_weights" in BLOCKS[0] and "prune_low_magnitude" in BLOCKS[0]
    assert "register_channel_rule(" in BLOCKS[1] and "shrink(" in BLOCKS[1]


@pytest.fixture
def restore_channel_rules():
    from keras_lean.structured import rules

    saved = dict(rules._CLASS_RULES)
    yield
    rules._CLASS_RULES.clear()
    rules._CLASS_RULES.update(saved)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=["prunable-layer", "channel-rule"])
def test_block_runs(index, restore_channel_rules, capsys):
    namespace = {"__name__": f"extending_md_block_{index}"}
    exec(compile(BLOCKS[index], f"{DOC}:block{index}", "exec"), namespace)
    if index == 0:
        assert "'mix': 0.75" in capsys.readouterr().out
