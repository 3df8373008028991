"""`recipe.yaml` as written by `configure`: every field with its value and a comment.

Split from `keras_lean.pipeline.recipe`, whose `recipe_to_yaml` calls `render_recipe`: the
parser lives there, the renderer here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keras_lean.pipeline.methods import method_classes
from keras_lean.pipeline.options import Section, field_comments
from keras_lean.pipeline.recipe import SECTIONS, Recipe, method_class


def _yaml_value(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def _render_section(options: Any, indent: int) -> list[str]:
    """Every field of `options` with its value and comment; sub-sections as nested blocks."""
    pad = "  " * indent
    comments = field_comments(type(options))
    lines = []
    for key, value in options.to_dict().items():
        comment = comments.get(key)
        tail = f"  # {comment}" if comment else ""
        sub = getattr(options, key, None)
        if isinstance(sub, Section) and isinstance(value, Mapping) and value:
            lines.append(f"{pad}{key}:{tail}")
            lines.extend(_render_section(sub, indent + 1))
        else:
            lines.append(f"{pad}{key}: {_yaml_value(value)}{tail}")
    return lines


def _pipeline_order() -> str:
    by_order: dict[int, list[str]] = {}
    for cls in method_classes():
        by_order.setdefault(cls.order, []).append(cls.name)
    return ", ".join("|".join(names) for _, names in sorted(by_order.items()))


def render_recipe(recipe: Recipe, *, header: str = "", layers: list[str] | None = None) -> str:
    """Renders `recipe` as a commented YAML document that `load_recipe` reads back equal.

    Every field of every section gets its comment (from the field's metadata).

    Args:
        recipe: the recipe.
        header: comment lines put at the top (without `#`).
        layers: the model's prunable layer names, listed as a comment for include/exclude.

    Returns:
        The YAML text.
    """
    out = []
    for line in header.strip().splitlines():
        out.append(f"# {line}".rstrip())
    if layers is not None:
        out.append("#")
        out.append("# Prunable layers of this model (use these names in include / exclude /")
        out.append("# overrides; fnmatch patterns such as 'conv*' work too):")
        for name in layers:
            out.append(f"#   - {name}")
    out.append("")
    out.append(f"version: {recipe.version}  # recipe format version")
    out.append(
        f"methods: {_yaml_value(list(recipe.methods))}  # applied in this pipeline order: "
        f"{_pipeline_order()}"
    )
    for name in recipe.methods:
        out += ["", f"{name}:  # {_first_line(method_class(name))}"]
        out.extend(_render_section(recipe.method_options[name], 1))
    for key, section_class in SECTIONS.items():
        out += ["", f"{key}:  # {_first_line(section_class)}"]
        out.extend(_render_section(recipe.sections[key], 1))
    out.append("")
    out += [
        "max_metric_drop:  # validate fails (exit 1) past this; the task picks the metric",
        f"  accuracy: {_yaml_value(recipe.max_accuracy_drop)}  # classifiers: absolute drop, "
        "0.01 = 1 point (alias: top-level max_accuracy_drop)",
        f"  perplexity: {_yaml_value(recipe.max_perplexity_rise)}  # causal LMs: relative rise "
        "(ppl_finetuned - ppl_baseline) / ppl_baseline, 0.1 = 10 %",
    ]
    return "\n".join(out) + "\n"


def _first_line(obj: Any) -> str:
    return (obj.__doc__ or obj.__name__).strip().splitlines()[0].rstrip(".")
