"""The method registry and contract: a new method is one registered class, nothing else."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import yaml

from keras_lean.pipeline import Recipe, load_recipe, recipe_to_yaml
from keras_lean.pipeline.methods import (
    METHODS,
    Method,
    get_method_class,
    method_classes,
    method_names,
    register_method,
)
from keras_lean.pipeline.methods.base import Data, FinetunePlan
from keras_lean.pipeline.options import Float, Int, RecipeError, Section, option
from keras_lean.pipeline.sweep import point_recipe, sweep_points

BUILT_IN = ("magnitude", "movement", "structured", "lowrank", "lottery", "lora")


@dataclasses.dataclass(frozen=True)
class TinyOptions(Section):
    """Options of the test's `tiny` method."""

    strength: float = option(0.25, Float(gt=0, lt=1), "how strongly tiny shrinks, in (0, 1)")
    repeats: int = option(1, Int(min=1), "how often")


class TinyMethod(Method):
    """A method defined in a test: scales nothing, records that it ran."""

    name: ClassVar[str] = "tiny"
    order: ClassVar[int] = 50
    options_class: ClassVar[type] = TinyOptions
    conflicts: ClassVar[dict] = {"structured": "tiny and structured fight over widths"}
    target_option: ClassVar[str | None] = "strength"
    target_help: ClassVar[str] = "how strongly tiny shrinks"
    sweep_targets: ClassVar[tuple[float, ...]] = (0.1, 0.2)
    state_attributes: ClassVar[tuple[str, ...]] = ("_seen",)

    def __init__(self, options):
        super().__init__(options)
        self._seen = None

    def prepare(self, model, data, plan):
        self._seen = {"layers": len(model.layers), "steps": plan.total_steps}
        return model

    def report(self):
        return {"strength": self.options.strength, "seen": self._seen}

    @classmethod
    def report_lines(cls, report):
        return [f"tiny: strength {report.get('strength')}"]


@pytest.fixture
def tiny():
    register_method(TinyMethod)
    try:
        yield TinyMethod
    finally:
        METHODS.pop("tiny", None)


def test_built_in_methods_register_in_order():
    assert method_names()[: len(BUILT_IN)] == BUILT_IN
    assert [c.name for c in method_classes()][: len(BUILT_IN)] == list(BUILT_IN)
    for name in BUILT_IN:
        cls = get_method_class(name)
        assert cls.name == name and issubclass(cls, Method)
        assert issubclass(cls.options_class, Section)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"Unknown method 'nope'\. Allowed: .*magnitude"):
        get_method_class("nope")
    with pytest.raises(TypeError, match="register_method takes a Method subclass"):
        register_method(dict)

    class Impostor(Method):
        name = "magnitude"
        order = 1
        options_class = TinyOptions

    with pytest.raises(ValueError, match="A method named 'magnitude' is already registered"):
        register_method(Impostor)
    assert get_method_class("magnitude").__name__ == "MagnitudeMethod"


def test_a_method_defined_in_a_test_works_through_the_recipe(tiny, tmp_path):
    assert "tiny" in method_names()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "methods": ["tiny"], "tiny": {"repeats": 3}}))
    rec = load_recipe(path)
    assert rec.method_options["tiny"] == TinyOptions(repeats=3)
    text = recipe_to_yaml(rec)
    assert "strength: 0.25  # how strongly tiny shrinks, in (0, 1)" in text
    assert load_recipe(_write(tmp_path, text)).to_dict() == rec.to_dict()
    with pytest.raises(RecipeError, match=r"tiny\.strength: must be in \(0, 1\)") as info:
        load_recipe(_write(tmp_path, "version: 1\nmethods: [tiny]\ntiny: {strength: 2}\n"))
    assert info.value.path == "tiny.strength"
    # Its conflicts are checked from either side, though structured does not know tiny.
    with pytest.raises(RecipeError, match="'structured' cannot be combined with 'tiny': tiny and"):
        Recipe.from_dict({"version": 1, "methods": ["structured", "tiny"]})
    # The guard asks the class, and names the stageable methods from the registry.
    with pytest.raises(RecipeError, match=r"guard: cannot be combined with method 'tiny'.*"
                       r"runs magnitude, movement, structured or soft_movement alone"):  # fmt: skip
        Recipe.from_dict({"version": 1, "methods": ["tiny"], "guard": {"stages": [0.5]}})
    # The sweep reads its target option and default targets.
    assert sweep_points(["tiny"]) == [("tiny", 0.1), ("tiny", 0.2)]
    assert point_recipe(Recipe(), "tiny", 0.3).method_options["tiny"].strength == 0.3


def test_configure_and_finetune_run_a_registered_method(tiny, trained_run):
    from keras_lean.pipeline import configure, finetune
    from keras_lean.pipeline.rundir import RunDir

    run = RunDir(trained_run)
    configure(run, methods=["tiny"], target_sparsity=0.4, epochs=1, jit_compile="off")
    rec = load_recipe(run.recipe)
    assert rec.methods == ("tiny",) and rec.method_options["tiny"].strength == 0.4
    assert "tiny:" in run.recipe.read_text()
    result = finetune(run, verbose=0)
    tiny_report = result.entry["details"]["methods"]["tiny"]
    assert tiny_report["strength"] == 0.4
    assert tiny_report["seen"]["steps"] > 0 and tiny_report["seen"]["layers"] > 3


def test_state_round_trips_through_the_method_file(tiny, tmp_path):
    method = TinyMethod(TinyOptions())
    model = type("M", (), {"layers": [1, 2]})()
    method.prepare(model, None, FinetunePlan(epochs=2, steps_per_epoch=3, batch_size=4))
    method.save_state(tmp_path)
    assert (tmp_path / "tiny.json").exists()
    fresh = TinyMethod(TinyOptions())
    assert fresh.report()["seen"] is None
    fresh.load_state(tmp_path)
    assert fresh.report()["seen"] == {"layers": 2, "steps": 6}
    # A missing file leaves the method as it is; another method's file is refused.
    other = TinyMethod(TinyOptions())
    other.load_state(tmp_path / "none")
    assert other.report()["seen"] is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tiny.json").write_text('{"method": "magnitude", "state": {}}')
    with pytest.raises(ValueError, match="not the state of method 'tiny'"):
        other.load_state(tmp_path / "bad")


def test_every_field_of_every_section_has_a_comment():
    from keras_lean.pipeline.options import Nested, field_comments
    from keras_lean.pipeline.recipe import SECTIONS

    def walk(cls, where):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("comment"), f"{where}.{f.name} has no comment"
            kind = f.metadata.get("kind")
            if isinstance(kind, Nested):
                walk(kind.section_class, f"{where}.{f.name}")

    for key, cls in SECTIONS.items():
        walk(cls, key)
    for cls in method_classes():
        walk(cls.options_class, cls.name)
        assert field_comments(cls.options_class)
    # And the generated recipe writes them: every `key: value` line carries a comment.
    rec = Recipe(methods=("structured", "lora"))
    for line in recipe_to_yaml(rec).splitlines():
        if line.strip() and not line.startswith("#") and ":" in line:
            assert "  # " in line, f"no comment on: {line!r}"


@pytest.mark.parametrize("name", method_names())  # every registered method, not only built-ins
def test_every_method_declares_its_target_and_guard_knowledge(name):
    cls = get_method_class(name)
    if cls.target_option is not None:
        assert cls.target_help, f"{name} must say what its target means"
        target = 0.3
        options = cls.with_target(cls.options_class(), target)
        assert isinstance(options, cls.options_class)
        assert options != cls.options_class() or getattr(options, cls.target_option) == target
        with pytest.raises(RecipeError, match=rf"^{name}\."):
            cls.with_target(cls.options_class(), -1.0)
    else:
        with pytest.raises(RecipeError, match=f"{name}: has no target option"):
            cls.with_target(cls.options_class(), 0.5)
    if not cls.guard_stageable:
        assert cls.guard_note
    for t in cls.sweep_targets:
        assert 0 < t < 1


def _write(tmp_path, text):
    path = tmp_path / "again.yaml"
    path.write_text(text)
    return path


def test_data_and_plan_are_the_contract_types():
    plan = FinetunePlan(epochs=3, steps_per_epoch=5, batch_size=8)
    assert plan.total_steps == 15
    assert {f.name for f in dataclasses.fields(Data)} >= {"x_train", "y_train", "num_classes"}
