"""Property test (issue 12): random recipe documents end in a `RecipeError` naming the field.

Documents mix the real keys of every section (at every depth) with unknown ones, wrong types,
out-of-range and non-finite numbers, empty and long lists, and raw bytes that are not UTF-8; a
recipe either loads or raises `RecipeError`, never another exception.
"""

from __future__ import annotations

import copy
import dataclasses

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_lean.pipeline.methods import method_classes, method_names
from keras_lean.pipeline.options import Nested, NestedMap, key_path
from keras_lean.pipeline.recipe import SECTIONS, Recipe, RecipeError, load_recipe, recipe_to_yaml

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    # Beyond float range.
    st.sampled_from([10**400, -(10**400), 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["on", "off", "auto", "AVG", "none", "int8", "tflite", "*", "1e-3", "", "x"]),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=12,
)
long_lists = st.lists(st.floats(min_value=-1, max_value=2), min_size=0, max_size=400)
#: Values at the edges of what fields accept, drawn often for every field.
edges = st.sampled_from(
    [10**400, -(10**400), float("nan"), float("inf"), -1, 0, 1, 2, 0.5, 1.0, "", "auto", [], {}]
)


def _section(section_class, depth=0):
    """A mapping using the section's own keys (random values) plus, sometimes, unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(section_class)}

    def value_for(f):
        kind = f.metadata.get("kind")
        if isinstance(kind, Nested) and depth < 2:
            return st.one_of(_section(kind.section_class, depth + 1), values)
        if isinstance(kind, NestedMap) and depth < 2:
            return st.one_of(
                st.dictionaries(
                    st.text(max_size=6), _section(kind.section_class, depth + 1), max_size=3
                ),
                values,
            )
        return st.one_of(edges, values, long_lists)

    known = st.fixed_dictionaries({}, optional={n: value_for(f) for n, f in fields.items()})
    unknown = st.dictionaries(st.text(min_size=1, max_size=8), values, max_size=2)
    return st.tuples(known, unknown, st.booleans()).map(
        lambda t: {**t[0], **t[1]} if t[2] else t[0]
    )


def _documents():
    names = list(method_names())
    sections = {key: st.one_of(_section(cls), values) for key, cls in SECTIONS.items()}
    sections.update(
        {c.name: st.one_of(_section(c.options_class), values) for c in method_classes()}
    )
    top = st.fixed_dictionaries(
        {},
        optional={
            "version": st.one_of(st.just(1), scalars),
            "methods": st.one_of(
                st.lists(st.sampled_from(names), max_size=3), st.sampled_from(names), values
            ),
            "max_accuracy_drop": st.one_of(edges, st.floats(), scalars),
            **sections,
        },
    )
    extra = st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), values, max_size=2)
    return st.one_of(
        st.tuples(top, extra, st.booleans()).map(lambda t: {**t[0], **t[1]} if t[2] else t[0]),
        values,
    )


def _check(tmp_path, payload: bytes, doc=None):
    """Loads `payload`; an error must be a RecipeError whose path starts at a key of the
    document (`doc`, when known) or a known top-level key."""
    path = tmp_path / "recipe.yaml"
    path.write_bytes(payload)
    try:
        recipe = load_recipe(path)
    except RecipeError as e:
        assert e.path, f"no field named: {e}"
        assert str(e).startswith(f"{path}: {e.path}: ")
        head = e.path.split(".")[0].split("[")[0]
        known = {"recipe", "version", "methods", "max_accuracy_drop", "max_metric_drop"}
        known |= {*SECTIONS, *method_names()}
        if isinstance(doc, dict):
            known |= {key_path(k) for k in doc}
            # A key such as '[' is a path of its own: `head` cuts it to ''.
            assert head in known or e.path in known, f"{e.path!r} is not a path of the document"
        return None
    assert isinstance(recipe, Recipe)
    # What loads also renders and loads back the same.
    path.write_text(recipe_to_yaml(recipe))
    assert load_recipe(path).to_dict() == recipe.to_dict()
    return recipe


@SETTINGS
@given(doc=_documents())
def test_random_documents_load_or_name_the_field(tmp_path, doc):
    _check(tmp_path, yaml.safe_dump(doc, allow_unicode=True).encode("utf-8"), doc)


def _paths(d, prefix=()):
    """Every key path of a nested mapping (to sub-mappings and to leaves)."""
    out = []
    for key, value in d.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(_paths(value, (*prefix, key)))
    return out


VALID_METHODS = [
    ("magnitude",),
    ("movement",),
    ("structured",),
    ("lowrank",),
    ("lottery",),
    ("lora",),
    ("structured", "lora"),
    ("structured", "lowrank", "lora"),
]


@SETTINGS
@given(data=st.data())
def test_valid_recipes_with_a_few_bad_fields_name_the_field(tmp_path, data):
    """A valid recipe with 1-3 fields replaced, added at any depth or removed: the error (if
    any) names a path that is really in the document."""
    doc = copy.deepcopy(Recipe(methods=data.draw(st.sampled_from(VALID_METHODS))).to_dict())
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(doc)))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "replace", "add", "delete"]))
        if action == "replace":
            # A copy: `edges` hands out the same `[]` / `{}` objects, which later steps mutate.
            parent[path[-1]] = copy.deepcopy(data.draw(st.one_of(edges, values, long_lists)))
        elif action == "add":
            target = parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent
            target[data.draw(st.text(min_size=1, max_size=6))] = copy.deepcopy(data.draw(values))
        else:
            del parent[path[-1]]
    _check(tmp_path, yaml.safe_dump(doc, allow_unicode=True).encode("utf-8"), doc)


@SETTINGS
@given(payload=st.binary(max_size=200))
def test_random_bytes_load_or_name_the_field(tmp_path, payload):
    _check(tmp_path, payload)


@SETTINGS
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{},&*!|>'\"# \n\t1.%@`")), max_size=80))
def test_random_yaml_text_loads_or_names_the_field(tmp_path, text):
    _check(tmp_path, ("version: 1\n" + text).encode("utf-8"))


def test_not_utf8_and_not_yaml_name_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"version: 1\n\xff\xfe\x80")
    try:
        load_recipe(path)
    except RecipeError as e:
        assert e.path == "recipe" and "not a UTF-8 text file" in e.message
        assert str(e).startswith(f"{path}: recipe: ")
    else:
        raise AssertionError("non-UTF-8 bytes must be refused")
