"""docs/CONFIG.md, written from the schema itself: every field's path, type, default and description.

    one-pipeline config-reference            # print it
    one-pipeline config-reference --write    # rewrite docs/CONFIG.md (a test checks that the file is current)
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config import Config

REFERENCE_PATH = Path(__file__).parent.parent / "docs" / "CONFIG.md"
HEADER = """# Config reference

Generated from the schema (`pipeline/config.py`) by `one-pipeline config-reference --write`; do not edit by
hand. One YAML file is validated against this schema: unknown keys, wrong types and impossible values are
rejected with the file, the field path and what is allowed (close matches are suggested). `one-pipeline
show-config CONFIG` prints a resolved config; `--set FIELD=VALUE` overrides one field on any command.
"""


def _type_text(annotation: Any) -> str:
    """A field's type as a reader writes it: `int`, `fp32 | int8_cpu`, `list[int]`, `int | None`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join("None" if a is type(None) else _type_text(a) for a in args)
    if origin is list:
        return f"list[{_type_text(args[0])}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, Path):
        value = str(value)
    return "None" if value is None else json.dumps(value)


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue  # sections get their own table
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name}` | {_type_text(annotation)} | `{_default_text(field)}` | {description} |")
    return rows


def reference_markdown() -> str:
    lines = [HEADER, "## Top level", "", "| field | type | default | meaning |", "|---|---|---|---|",
             *_rows(Config, "")]
    for name, field in Config.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            doc = (section.__doc__ or "").strip()
            lines += ["", f"## `{name}`", "", *([doc, ""] if doc else []), "| field | type | default | meaning |",
                      "|---|---|---|---|", *_rows(section, f"{name}.")]
    return "\n".join(lines) + "\n"
