from __future__ import annotations

import dataclasses

import pytest
import yaml

from keras_lean.pipeline import recipe as recipe_mod
from keras_lean.pipeline.methods import METHODS
from keras_lean.pipeline.recipe import (
    ExportOptions,
    FinetuneOptions,
    Recipe,
    RecipeError,
    load_recipe,
    recipe_to_yaml,
)


def _write(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults():
    r = Recipe()
    assert r.methods == ("magnitude",)
    assert r.method_options["magnitude"].target_sparsity == 0.8
    assert r.finetune == FinetuneOptions()
    assert r.export == ExportOptions()
    assert r.max_accuracy_drop == 0.01


def test_commented_yaml_round_trips(tmp_path):
    r = Recipe.from_dict(
        {
            "version": 1,
            "methods": ["movement"],
            "movement": {
                "target_sparsity": 0.6,
                "schedule": {"kind": "constant", "begin": 2, "end": 40, "unit": "steps"},
                "m_by_n": [2, 4],
                "exclude": ["output"],
                "overrides": {"dense*": {"target_sparsity": 0.5}},
            },
            "finetune": {"epochs": 2, "jit_compile": "on", "early_stopping": {"enabled": True}},
            "export": {"quantization": "int8", "formats": ["tflite"]},
            "max_accuracy_drop": 0.05,
        }
    )
    text = recipe_to_yaml(r, header="a header", layers=["conv1 (Conv2D, 320 params)"])
    assert "# a header" in text and "#   - conv1" in text
    path = _write(tmp_path, text)
    assert load_recipe(path).to_dict() == r.to_dict()


def test_yaml_on_off_and_numbers(tmp_path):
    path = _write(
        tmp_path,
        "version: 1\nfinetune:\n  jit_compile: off\n  mixed_precision: on\n  learning_rate: 1e-3\n",
    )
    ft = load_recipe(path).finetune
    assert ft.jit_compile == "off" and ft.mixed_precision is True and ft.learning_rate == 1e-3


@pytest.mark.parametrize(
    "data, path, match",
    [
        ({"version": 1, "finetun": {}}, "finetun", r"finetun: unknown key\b"),
        (
            {"version": 1, "finetune": {"epohcs": 3}},
            "finetune.epohcs",
            r"finetune\.epohcs: unknown key",
        ),
        (
            {"version": 1, "magnitude": {"sparsity": 0.5}},
            "magnitude.sparsity",
            r"magnitude\.sparsity: unknown key",
        ),
        (
            {"version": 1, "magnitude": {"overrides": {"d*": {"sparsity": 1}}}},
            "magnitude.overrides.d*.sparsity",
            r"magnitude\.overrides\.d\*\.sparsity: unknown key",
        ),
        (
            {"version": 1, "magnitude": {"schedule": {"kind": "linear"}}},
            "magnitude.schedule.kind",
            r"magnitude\.schedule\.kind: must be one of polynomial, constant",
        ),
        (
            {"version": 1, "magnitude": {"schedule": {"begin": 0.5, "end": 0.2}}},
            "magnitude.schedule.end",
            r"magnitude\.schedule\.end: must be after",
        ),
        (
            {"version": 1, "magnitude": {"target_sparsity": 1.5}},
            "magnitude.target_sparsity",
            r"target_sparsity: must be in \[0, 1\)",
        ),
        (
            {"version": 1, "finetune": {"jit_compile": "maybe"}},
            "finetune.jit_compile",
            r"jit_compile: must be one of",
        ),
        (
            {"version": 1, "finetune": {"epochs": 0}},
            "finetune.epochs",
            r"finetune\.epochs: must be an int >= 1",
        ),
        (
            {"version": 1, "export": {"quantization": "int4"}},
            "export.quantization",
            r"quantization: must be one of",
        ),
        (
            {"version": 1, "max_accuracy_drop": 2},
            "max_accuracy_drop",
            r"max_accuracy_drop: must be in \[0, 1\]",
        ),
        ({"version": 2}, "version", r"version: must be 1"),
        ({"methods": ["magnitude"]}, "version", r"version: is missing"),
        ({"version": 1, "methods": ["prune"]}, "methods", r"unknown method 'prune'"),
        (
            {"version": 1, "movement": {}},
            "movement",
            r"movement: is given but 'movement' is not in",
        ),
        (
            {"version": 1, "methods": ["magnitude", "movement"]},
            "methods",
            r"'magnitude' cannot be combined with 'movement': both prune",
        ),
    ],
    ids=[
        "unknown-section",
        "unknown-finetune-key",
        "unknown-method-key",
        "unknown-override-key",
        "bad-schedule-kind",
        "end-before-begin",
        "sparsity-range",
        "bad-jit",
        "zero-epochs",
        "bad-quantization",
        "drop-range",
        "wrong-version",
        "missing-version",
        "unknown-method",
        "section-without-method",
        "magnitude-and-movement",
    ],
)
def test_bad_recipes_name_the_field(tmp_path, data, path, match):
    file = _write(tmp_path, data)
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(file)
    assert str(file) in str(info.value)
    assert info.value.path == path
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "version: [1\n"))
    with pytest.raises(FileNotFoundError, match="Recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_method_missing_from_install_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(METHODS, "ghost", "keras_lean.pipeline.methods.ghost:GhostMethod")
    with pytest.raises(ValueError, match="method 'ghost' is not available in this install"):
        Recipe.from_dict({"version": 1, "methods": ["ghost"]})


def test_magnitude_refuses_lora(monkeypatch):
    from keras_lean.pipeline.methods.base import Method

    @dataclasses.dataclass(frozen=True)
    class Opts:
        @classmethod
        def from_dict(cls, d):
            return cls()

        def to_dict(self):
            return {}

    class FakeLora(Method):
        name = "lora"
        order = 40
        options_class = Opts

    # The conflict is declared once, on lora's side, and checked both ways: a stand-in `lora`
    # that declares none is accepted, which shows the refusal comes from the lora class.
    with pytest.raises(ValueError, match="'magnitude' cannot be combined with 'lora'"):
        Recipe.from_dict({"version": 1, "methods": ["magnitude", "lora"]})
    monkeypatch.setitem(METHODS, "lora", FakeLora)
    r = Recipe.from_dict({"version": 1, "methods": ["magnitude", "lora"]})
    assert r.methods == ("magnitude", "lora")


def test_a_new_section_is_one_registry_entry(monkeypatch, tmp_path):
    from keras_lean.pipeline.options import Float, List, Section, option

    @dataclasses.dataclass(frozen=True)
    class NewSection(Section):
        stages: tuple = option((), List(Float(gt=0, lt=1)), "the stages")

    monkeypatch.setitem(recipe_mod.SECTIONS, "extra", NewSection)
    r = load_recipe(_write(tmp_path, {"version": 1, "extra": {"stages": [0.3, 0.5]}}))
    assert r.sections["extra"].stages == (0.3, 0.5)
    assert "stages: [0.3, 0.5]  # the stages" in recipe_to_yaml(r)
    with pytest.raises(RecipeError, match=r"extra\.stagse: unknown key") as info:
        load_recipe(_write(tmp_path, {"version": 1, "extra": {"stagse": []}}))
    assert info.value.path == "extra.stagse"
    with pytest.raises(RecipeError, match=r"extra\.stages\[1\]: must be in \(0, 1\)"):
        load_recipe(_write(tmp_path, {"version": 1, "extra": {"stages": [0.3, 2]}}))
    assert not hasattr(Recipe, "section"), "dead code: use recipe.sections[key]"


def test_replace_revalidates():
    r = Recipe()
    r2 = r.replace(finetune=dataclasses.replace(r.finetune, epochs=7), max_accuracy_drop=0.2)
    assert r2.finetune.epochs == 7 and r2.max_accuracy_drop == 0.2 and r.finetune.epochs == 4
    with pytest.raises(RecipeError, match="max_accuracy_drop: must be in"):
        r.replace(max_accuracy_drop=-1)
    with pytest.raises(RecipeError, match=r"finetune\.epochs: must be an int >= 1"):
        dataclasses.replace(r.finetune, epochs=0)  # a section knows its place in the recipe
