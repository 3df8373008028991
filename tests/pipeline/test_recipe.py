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
    "data, match",
    [
        ({"version": 1, "finetun": {}}, r"Unknown key recipe\.finetun\b"),
        ({"version": 1, "finetune": {"epohcs": 3}}, r"Unknown key recipe\.finetune\.epohcs"),
        ({"version": 1, "magnitude": {"sparsity": 0.5}}, r"recipe\.magnitude\.sparsity"),
        (
            {"version": 1, "magnitude": {"overrides": {"d*": {"sparsity": 1}}}},
            r"recipe\.magnitude\.overrides\.d\*\.sparsity",
        ),
        (
            {"version": 1, "magnitude": {"schedule": {"kind": "linear"}}},
            r"recipe\.magnitude\.schedule\.kind must be one of polynomial, constant",
        ),
        (
            {"version": 1, "magnitude": {"schedule": {"begin": 0.5, "end": 0.2}}},
            r"recipe\.magnitude\.schedule\.end must be after",
        ),
        ({"version": 1, "magnitude": {"target_sparsity": 1.5}}, r"target_sparsity must be in"),
        ({"version": 1, "finetune": {"jit_compile": "maybe"}}, r"jit_compile must be one of"),
        ({"version": 1, "finetune": {"epochs": 0}}, r"recipe\.finetune\.epochs must be >= 1"),
        ({"version": 1, "export": {"quantization": "int4"}}, r"quantization must be one of"),
        ({"version": 1, "max_accuracy_drop": 2}, r"max_accuracy_drop must be in \[0, 1\]"),
        ({"version": 2}, r"recipe\.version must be 1"),
        ({"methods": ["magnitude"]}, r"recipe\.version is missing"),
        ({"version": 1, "methods": ["prune"]}, r"unknown method 'prune'"),
        ({"version": 1, "movement": {}}, r"recipe\.movement is given but 'movement' is not in"),
        (
            {"version": 1, "methods": ["magnitude", "movement"]},
            r"'magnitude' and 'movement' both prune",
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
def test_bad_recipes_name_the_field(tmp_path, data, match):
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=match) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


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

    monkeypatch.setattr(
        recipe_mod,
        "method_class",
        lambda n, path="": (
            FakeLora
            if n == "lora"
            else __import__(
                "keras_lean.pipeline.methods.magnitude", fromlist=["MagnitudeMethod"]
            ).MagnitudeMethod
        ),
    )
    with pytest.raises(ValueError, match="'magnitude' cannot be combined with 'lora'"):
        Recipe.from_dict({"version": 1, "methods": ["magnitude", "lora"]})


def test_a_new_section_is_one_registry_entry(monkeypatch, tmp_path):
    @dataclasses.dataclass(frozen=True)
    class GuardOptions:
        stages: tuple = ()

        def to_dict(self):
            return {"stages": list(self.stages)}

        @classmethod
        def from_dict(cls, d, path="recipe.guard"):
            recipe_mod.check_keys(d, {"stages"}, path)
            return cls(tuple(d.get("stages", ())))

    monkeypatch.setitem(recipe_mod.SECTIONS, "guard", GuardOptions)
    r = load_recipe(_write(tmp_path, {"version": 1, "guard": {"stages": [0.3, 0.5]}}))
    assert r.section("guard").stages == (0.3, 0.5)
    with pytest.raises(ValueError, match=r"Unknown key recipe\.guard\.stagse"):
        load_recipe(_write(tmp_path, {"version": 1, "guard": {"stagse": []}}))


def test_replace_revalidates():
    r = Recipe()
    r2 = r.replace(finetune=dataclasses.replace(r.finetune, epochs=7), max_accuracy_drop=0.2)
    assert r2.finetune.epochs == 7 and r2.max_accuracy_drop == 0.2 and r.finetune.epochs == 4
    with pytest.raises(ValueError, match="max_accuracy_drop must be in"):
        r.replace(max_accuracy_drop=-1)
