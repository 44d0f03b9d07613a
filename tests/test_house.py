"""The code stays easy to read: no file over 400 lines and no function over 60 in pipeline/ and stages/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
SOURCES = sorted(p for folder in ("pipeline", "stages") for p in (ROOT / folder).rglob("*.py"))
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def test_the_sources_are_found():
    assert len(SOURCES) > 40 and ROOT / "stages" / "bench.py" in SOURCES


def test_no_file_over_400_lines():
    lengths = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in SOURCES}
    long = {name: n for name, n in lengths.items() if n > MAX_FILE_LINES}
    assert not long, f"split these files: {long}"


def test_no_function_over_60_lines():
    long = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {node.name}"] = length
    assert not long, f"split these functions: {long}"
