"""docs/RESULTS.md and the README's key-results table, rendered from the JSON records in docs/results/.

    one-pipeline results            # print docs/RESULTS.md
    one-pipeline results --write    # rewrite docs/RESULTS.md and the README's key-results table (a test checks both)

A record is a JSON file with a `title`, the exact `command`, the `date`, the `cpu` (lscpu's model name), the
`version` (the package's) and either `bench` (a bench.json beside it, rendered here) or `tables` copied from an
earlier record (`"transcribed": true`: the JSON those figures came from was not kept). Files without a `title`
are the data a record names (a bench.json, a plan.json).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.errors import ArtifactError

ROOT = Path(__file__).parent.parent
RESULTS_DIR = ROOT / "docs" / "results"
RESULTS_PATH = ROOT / "docs" / "RESULTS.md"
README_PATH = ROOT / "README.md"
KEY_BEGIN = "<!-- key results: generated from docs/results by `one-pipeline results --write`; do not edit -->"
KEY_END = "<!-- end of key results -->"
REQUIRED = ("title", "command", "date", "cpu", "version")
HEADER = """# Results

Every measured table of one-pipeline, generated from the JSON records in `docs/results/` by `one-pipeline results
--write`; do not edit by hand. Each section names the exact command, the date, the CPU (`lscpu`'s model name) and
the one-pipeline version it was measured at. Sections marked *transcribed from an earlier record* were measured by
an earlier version whose JSON was not kept: their figures are copied from that record. Timings move with the CPU
and with what else runs on it: compare rows measured in one run, not across sections.
"""

Table = dict[str, list]
NUMERIC = re.compile(r"^[-+]?[\d,.]+( ± [\d.]+)?( \(.*\))?$|^-$")  # right-aligned: 90.34 ± 0.22, 5,000, -0.66


def load_records(folder: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every record in `folder`, in its `order`; each gets `_folder` and `_name` (the file's stem)."""
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ArtifactError(f"{path}: not valid JSON ({exc}); fix or remove the file")
        if "title" not in data:
            continue  # data a record names
        missing = [key for key in REQUIRED if not data.get(key)]
        if missing:
            raise ArtifactError(f"{path}: a result record needs {', '.join(missing)}; add them to the file")
        if "bench" not in data and "tables" not in data:
            raise ArtifactError(f"{path}: a result record needs `bench` (a bench.json) or `tables`")
        records.append({**data, "_folder": folder, "_name": path.stem})
    return sorted(records, key=lambda r: (r.get("order", 1000), r["_name"]))


def _data(record: dict[str, Any], key: str) -> dict[str, Any] | None:
    name = record.get(key)
    if not name:
        return None
    path = record["_folder"] / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: named by {record['_name']}.json but not readable ({exc})")


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _forms_table(bench: dict[str, Any]) -> Table:
    batches = bench["batch_sizes"]
    columns = ["form", "top-1 %", "batch-1 p50 ms", *(f"img/s @{b}" for b in batches), "MB"]
    rows = []
    for row in bench["rows"]:
        if row["status"] != "ok":
            continue
        rates = {t["batch"]: t["images_per_s"] for t in row.get("throughput") or []}
        latency = (row.get("latency_ms") or {}).get("p50")
        label = row["label"] + (", PyTorch eager" if row.get("format") == "pytorch" else "")
        rows.append([label, _num(row.get("accuracy"), ".2f"), _num(latency, ".3f"),
                     *(_num(rates.get(b), ",.0f") for b in batches), _num(row.get("file_bytes", 0) / 1e6, ".2f")])
    return {"columns": columns, "rows": rows}


def _plan_table(plan: dict[str, Any]) -> Table:
    rows = [[c["label"] + (" (chosen)" if c.get("chosen") else ""), f"{c['flops_ratio']:.2f}",
             f"{c['speedup']:.2f}", "yes" if c.get("meets") else "no"] for c in plan.get("candidates", [])]
    return {"columns": ["plan (stage widths / inner widths / blocks)", "FLOPs ratio", "speed-up", "meets target"],
            "rows": rows, "caption": "Every plan the latency planner timed (compress/plan.json)"}


def _skipped(bench: dict[str, Any]) -> str | None:
    """The forms not measured, folded into one line per reason."""
    by_reason: dict[str, list[str]] = {}
    for row in bench["rows"]:
        if row["status"] != "ok":
            by_reason.setdefault(row.get("reason") or row["status"], []).append(row["name"])
    if not by_reason:
        return None
    parts = [f"{', '.join(f'`{n}`' for n in names)} ({reason})" for reason, names in by_reason.items()]
    return "Not measured here: " + "; ".join(parts) + "."


def _ratio_note(name: str, gain: dict[str, Any] | None) -> str | None:
    if not gain:
        return None
    return (f"{name}: `{gain['row']}` against `{gain['versus']}`, {gain['speedup_p50']:.2f}x at batch 1 and "
            f"{gain['throughput_ratio']:.2f}x the images/s at batch {gain['batch']}, "
            f"{gain['accuracy_delta']:+.2f} top-1 points.")


def _target_note(target: dict[str, Any] | None) -> str | None:
    if not target:
        return None
    goal = f"{target['value']}x" if target["kind"] == "speedup" else f"{target['value']} ms"
    text = (f"Latency target: {goal} at batch {target['batch']} in {target['runtime']} {target['precision']}; "
            f"planned {target['plan']} at {target['planned_speedup']:.2f}x")
    if target.get("met"):
        return text + f"; achieved {target['achieved_speedup']:.2f}x in the bench: met."
    return text + f"; not met: {target.get('reason') or target.get('why')}."


def _bench_notes(record: dict[str, Any], bench: dict[str, Any]) -> list[str]:
    head = bench.get("headline") or {}
    ship = head.get("ship") or {}
    env = bench.get("environment", {})
    notes = [f"{bench['test_images']:,} test images, {bench['threads']} threads, {bench['device']}; torch "
             f"{env.get('torch')}, ONNX Runtime {env.get('onnxruntime')}."]
    notes += [n for n in (_ratio_note("Strip", head.get("strip")), _ratio_note("Runtime", head.get("runtime_gain")),
                          _ratio_note("Precision", head.get("precision_gain")),
                          _ratio_note("Prune", head.get("prune"))) if n]
    if ship:
        notes.append(f"Ship pick: `{ship['row']}` ({ship['file']}, Triton model `{ship.get('triton_model')}`): "
                     f"{ship['reason']}; by throughput: {ship.get('other_objective')}.")
    notes += [f"{row['label']}: {row.get('note')}; served by {row.get('provider')}." for row in bench["rows"]
              if row["status"] == "ok" and row.get("format") == "triton"]
    notes += [n for n in (_target_note(head.get("target")), _skipped(bench)) if n]
    return notes


def _bench_tables(record: dict[str, Any]) -> tuple[list[Table], list[str]]:
    bench = _data(record, "bench")
    tables = [_forms_table(bench)]
    stages = record.get("stages_s")
    if stages:
        rows = [[stage, f"{seconds:.1f}"] for stage, seconds in stages.items()]
        if record.get("wall_s"):
            rows.append(["whole command", f"{record['wall_s']:.1f} ({_minutes(record['wall_s'])})"])
        tables.append({"columns": ["stage", "wall s"], "rows": rows})
    plan = _data(record, "plan")
    if plan:
        tables.append(_plan_table(plan))
    return tables, _bench_notes(record, bench)


def _minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"


def tables_and_notes(record: dict[str, Any]) -> tuple[list[Table], list[str]]:
    if "bench" in record:
        tables, notes = _bench_tables(record)
        return tables, notes + list(record.get("notes", []))
    return record["tables"], list(record.get("notes", []))


def _markdown_table(table: Table) -> list[str]:
    def line(cells: list) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    numeric = [i > 0 and all(NUMERIC.match(str(r[i])) or not str(r[i]) for r in table["rows"])
               for i in range(len(table["columns"]))]
    align = ["---:" if right else "---" for right in numeric]
    caption = [f"*{table['caption']}:*", ""] if table.get("caption") else []
    return [*caption, line(table["columns"]), "|" + "|".join(align) + "|", *(line(r) for r in table["rows"]), ""]


def section(record: dict[str, Any]) -> list[str]:
    detail = f" ({record['cpu_detail']})" if record.get("cpu_detail") else ""
    lines = [f"## {record['title']}", "", f"- Command: `{record['command']}`"]
    lines += [f"  - `{command}`" for command in record.get("commands", [])]
    lines.append(f"- Measured: {record['date']} on {record['cpu']}{detail}, one-pipeline {record['version']}")
    if record.get("transcribed"):
        lines.append("- *Transcribed from an earlier record* (its JSON was not kept)")
    sources = [record["_name"] + ".json", *(record[k] for k in ("bench", "plan") if record.get(k))]
    lines += [f"- Source: {', '.join(f'`docs/results/{s}`' for s in sources)}", ""]
    if record.get("setting"):
        lines += [record["setting"], ""]
    tables, notes = tables_and_notes(record)
    for table in tables:
        lines += _markdown_table(table)
    lines += [f"- {note}" for note in notes]
    return lines + ([""] if notes else [])


def results_markdown(folder: Path = RESULTS_DIR) -> str:
    lines = [HEADER]
    for record in load_records(folder):
        lines += section(record)
    return "\n".join(lines).rstrip("\n") + "\n"


def _by_name(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for record in records:
        if record["_name"] == name:
            return record
    raise ArtifactError(f"docs/results/{name}.json is missing: the README's key results are drawn from it")


def cell(record: dict[str, Any], first: str, column: str, table: int = 0) -> str:
    """A transcribed table's cell: the row whose first cell starts with `first`, under `column`."""
    data = record["tables"][table]
    index = data["columns"].index(column)
    for row in data["rows"]:
        if str(row[0]).startswith(first):
            return str(row[index])
    raise ArtifactError(f"docs/results/{record['_name']}.json: no row {first!r} in table {table}")


def _verdict(target: dict[str, Any]) -> str:
    if target.get("met"):
        return f"met, {target['achieved_speedup']:.2f}x"
    if target.get("why") != "accuracy_guard":
        return f"missed ({target.get('why')})"
    lost = re.search(r"loses ([\d.]+) top-1 points", target.get("reason") or "")
    points = f"lost {lost.group(1)} validation points: " if lost else ""
    return f"not deployed ({points}the accuracy guard kept it back)"


def _quickstart_rows(record: dict[str, Any]) -> list[list[str]]:
    bench = _data(record, "bench")
    rows = {row["name"]: row for row in bench["rows"]}
    head = bench["headline"]
    ship, strip, target = rows[head["ship"]["row"]], head["strip"], head.get("target")
    branch, one_e = rows[strip["row"]], rows[strip["versus"]]
    env = bench["environment"]
    out = [[f"Quickstart, the whole `{record['command']}`", f"{_minutes(record['wall_s'])} on {env['cpu_count']} "
            f"{record['cpu']} cores, {env.get('cuda') or 'no GPU'}"],
           ["Kept branch, test top-1 (ONE-E, the full model)", f"{branch['accuracy']:.2f}% ({one_e['accuracy']:.2f}%)"],
           ["Kept branch against ONE-E, ONNX Runtime fp32, batch-1 p50",
            f"{branch['latency_ms']['p50']:.3f} vs {one_e['latency_ms']['p50']:.3f} ms ({strip['speedup_p50']:.2f}x)"],
           [f"Form shipped (the fastest within {head['ship']['max_accuracy_drop']} top-1 points)",
            f"{ship['label']}: {ship['accuracy']:.2f}%, {ship['latency_ms']['p50']:.3f} ms"]]
    if target:
        goal = f"{target['value']}x" if target["kind"] == "speedup" else f"{target['value']} ms"
        out.append([f"Pruned to the {goal} latency target", _verdict(target)])
    return [[what, figure, record["date"]] for what, figure in out]


def _ci(gain: str) -> str:
    """`-0.63 (-1.52 to +0.26)` -> `-0.63 (95% CI -1.52 to +0.26)`."""
    return gain.replace(" (", " (95% CI ", 1)


def _p(gain_and_p: str) -> str:
    """The gain map's `+0.84 (-0.08 to +1.75), 0.067` as `gain +0.84 (95% CI ...), p 0.067`."""
    gain, p = gain_and_p.rsplit(", ", 1)
    return f"gain {_ci(gain)}, p {p}"


def key_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    quickstart, compare = _by_name(records, "quickstart"), _by_name(records, "compare_edge")
    pruned, regimes = _by_name(records, "compress_compare_edge"), _by_name(records, "gain_map")
    rows = _quickstart_rows(quickstart)
    rows.append(["ONE kept branch vs the same network trained alone, quickstart recipe, 3 seeds",
                 f"{cell(compare, 'ONE kept branch', 'mean ± std')} vs {cell(compare, 'vanilla', 'mean ± std')}: "
                 f"gain {_ci(cell(compare, 'ONE kept', 'paired gain (95% CI)', 1))}, "
                 f"p {cell(compare, 'ONE kept', 'p', 1)}",
                 compare["date"]])
    rows.append(["Pruned to 0.5x FLOPs: ONE, KD from ONE-E vs vanilla, labels only",
                 f"{cell(pruned, '(1)', 'mean ± std')} vs {cell(pruned, '(4)', 'mean ± std')}: "
                 f"gain {cell(pruned, '(1) - (4)', 'paired difference', 1)}, p {cell(pruned, '(1) - (4)', 'p', 1)}",
                 pruned["date"]])
    lvf = _by_name(records, "latency_vs_flops")
    rows.append(["Pruned to a latency target vs to 0.5x FLOPs, at the FLOPs plan's measured speed, 3 seeds",
                 f"{cell(lvf, 'mean', 'latency plan')} vs {cell(lvf, 'mean', 'FLOPs plan')}: "
                 f"gain {cell(lvf, 'mean', 'latency - FLOPs')}", lvf["date"]])
    rows.append(["Closest ONE came: 40% noisy labels, 5,000 images, 7 seeds",
                 _p(cell(regimes, "noisy labels", "gain (paired 95% CI), p")), regimes["date"]])
    return rows


def key_results_markdown(folder: Path = RESULTS_DIR) -> str:
    table = {"columns": ["result", "figure", "measured"], "rows": key_rows(load_records(folder))}
    return "\n".join([KEY_BEGIN, *_markdown_table(table), KEY_END])


def readme_with_key_results(readme: str, folder: Path = RESULTS_DIR) -> str:
    if KEY_BEGIN not in readme or KEY_END not in readme:
        raise ArtifactError("README.md lacks the key-results markers; put them back where the table goes")
    before, rest = readme.split(KEY_BEGIN, 1)
    after = rest.split(KEY_END, 1)[1]
    return before + key_results_markdown(folder) + after
