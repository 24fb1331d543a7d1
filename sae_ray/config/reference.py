"""docs/configuration.md, written from the schema itself: every section's keys with their
type, default and description, so the reference cannot drift from what the YAML accepts
(a test compares the page with this output, and refuses a field without a description).

    python -m sae_ray.config.reference > docs/configuration.md
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sae_ray.config.analysis import Contrast, Primary
from sae_ray.config.schema import Config
from sae_ray.config.search import Constraint, Objective, SpaceEntry

# Models that appear inside a section's field (lists, mappings): tables of their own.
NESTED: list[tuple[str, type[BaseModel]]] = [
    ("search.space.<dotted key>", SpaceEntry),
    ("search.objectives[]", Objective),
    ("search.constraints[]", Constraint),
    ("analysis.primary", Primary),
    ("analysis.contrasts[]", Contrast),
]
HEAD = """# Configuration reference

Every key of a sweep YAML, section by section: its type, its default and what it does.
Dotted overrides on the command line use the same names (`sae-ray sweep FILE sae.k=16`),
and `search.space` searches any of them but the sweep's own settings (`experiment.name`,
`.storage_path`, `.shared_filesystem`, `.share_artifacts`, and the `search`, `resources`
and `wandb` sections). Unknown keys are refused, naming the key.

This page is generated from `sae_ray/config/` (`python -m sae_ray.config.reference >
docs/configuration.md`); `tests/test_docs.py` keeps it current.
"""


def type_name(annotation: Any) -> str:
    """A field's type in words a YAML author reads: `4 | 8`, `int or null`, `list of int`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        kept = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(kept) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def default_of(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{value}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{field.default}`" if field.default is not None else "null"


def table(prefix: str, model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        text = (field.description or "").replace("|", "\\|").replace("\n", " ")
        key = f"{prefix}.{name}" if prefix else name
        row = [f"`{key}`", type_name(field.annotation), default_of(field), text]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def undescribed() -> list[str]:
    """Keys without a description (the reference would say nothing of them)."""
    missing = []
    for name, field in Config.model_fields.items():
        for sub, inner in field.annotation.model_fields.items():
            if not inner.description:
                missing.append(f"{name}.{sub}")
    for prefix, model in NESTED:
        missing += [f"{prefix}.{k}" for k, f in model.model_fields.items() if not f.description]
    return missing


def reference() -> str:
    lines = [HEAD]
    for name, field in Config.model_fields.items():
        section = field.annotation
        lines += [f"## `{name}`", ""]
        doc = (section.__doc__ or "").strip()
        if doc and not doc.startswith("!!!"):
            lines += [" ".join(doc.split()), ""]
        lines += [*table(name, section), ""]
    lines += ["## Inside the sections", ""]
    for prefix, model in NESTED:
        lines += [f"### `{prefix}`", "", *table(prefix, model), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
