"""The `one-pipeline` command line: a thin layer over the runner. Errors become one line and an exit code
(2: usage or config, 1: runtime, 130: interrupted); `--debug` shows the traceback."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import distributed
from pipeline.config import load_config
from pipeline.errors import PipelineError, UsageError
from pipeline.rundir import RunDir
from pipeline.runner import STAGE_NAMES, STAGES, run_stages, stage_def, state
from pipeline.stage import StageContext

app = typer.Typer(help="ONE knowledge distillation, from training to a deployable branch.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
errors = Console(stderr=True)

DEFAULT_CONFIG = Path("configs/edge.yaml")
ConfigArg = typer.Argument(DEFAULT_CONFIG, help="YAML config", show_default=True)
SetOpt = typer.Option(None, "--set", help="Override one field, e.g. --set train.epochs=2 (repeatable)")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks")


def _guard(action: Callable[[], None], debug: bool) -> None:
    """Map our errors to one line and an exit code; a user's mistake never shows a traceback."""
    try:
        action()
    except PipelineError as exc:
        if debug:
            raise
        errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:
        errors.print("interrupted; run the same command again to resume")
        raise typer.Exit(130)
    except OSError as exc:  # a file or folder the project could not use; the message names it
        if debug:
            raise
        errors.print(f"[red]error:[/red] {escape(str(exc))}; check the path, its permissions and the free space",
                     highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _check_stage(name: Optional[str], option: str) -> Optional[str]:
    if name is not None and name not in STAGE_NAMES:
        raise UsageError(f"{option} {name!r} is not a stage; choose one of {', '.join(STAGE_NAMES)}")
    return name


def _execute(config: Path, overrides: list[str] | None, *, until: str | None = None, force: str | None = None,
             only: str | None = None) -> None:
    cfg = load_config(config, overrides or [])
    rank, world, device = distributed.init(cfg.train.device)
    run = RunDir(cfg.run_dir)
    ctx = StageContext(cfg, run, device, console=console if rank == 0 else Console(quiet=True), rank=rank,
                       world=world)
    results: dict[str, str] = {}
    with run.lock() if rank == 0 else contextlib.nullcontext():
        if world > 1:  # under torchrun every rank trains; then rank 0 alone runs the later stages
            try:
                results = run_stages(cfg, run, ctx, until="train", force="train" if force == "train" else None)
            finally:
                distributed.shutdown()
            if rank != 0:
                return
            ctx = dataclasses.replace(ctx, rank=0, world=1)
            force = None if force == "train" else force
        results = {**run_stages(cfg, run, ctx, until=until, force=force, only=only), **results}
    console.print(f"[bold]{escape(str(cfg.run_dir))}[/bold]: {', '.join(f'{k} {v}' for k, v in results.items())}")


@app.command()
def run(config: Path = ConfigArg, overrides: Optional[list[str]] = SetOpt,
        until: Optional[str] = typer.Option(None, help=f"Stop after this stage ({', '.join(STAGE_NAMES)})"),
        from_stage: Optional[str] = typer.Option(None, "--from", help="Rerun this stage and every stage after it"),
        force: bool = typer.Option(False, "--force", help="Rerun every stage even if up to date"),
        debug: bool = DebugOpt) -> None:
    """Run every stage in order, skipping those already up to date."""
    def action() -> None:
        if force and from_stage:
            raise UsageError("--force reruns every stage and --from reruns from one; give one of them")
        _execute(config, overrides, until=_check_stage(until, "--until"),
                 force=STAGE_NAMES[0] if force else _check_stage(from_stage, "--from"))

    _guard(action, debug)


def _sentence(text: str) -> str:
    """The first letter up, the rest as written: str.capitalize() would turn ONE, TensorRT, ONNX lower-case."""
    return text[:1].upper() + text[1:]


def _stage_command(name: str, extra_help: str = "") -> None:
    def command(config: Path = ConfigArg, overrides: Optional[list[str]] = SetOpt,
                force: bool = typer.Option(False, "--force", help="Rerun it even if up to date"),
                debug: bool = DebugOpt) -> None:
        _guard(lambda: _execute(config, overrides, only=name, force=name if force else None), debug)

    command.__doc__ = f"{_sentence(stage_def(name).help)} (after the stages it needs).{extra_help}"
    app.command(name)(command)


def _branch_command(name: str) -> None:
    def command(config: Path = ConfigArg, branch: str = typer.Option(
                    "best", help="'best' (validation accuracy) or a branch index"),
                overrides: Optional[list[str]] = SetOpt,
                force: bool = typer.Option(False, "--force", help="Rerun it even if up to date"),
                debug: bool = DebugOpt) -> None:
        if branch != "best" and not branch.isdigit():
            errors.print(f"[red]error:[/red] --branch {escape(repr(branch))}: expected 'best' or a branch index "
                         "(0, 1, ...)", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        sets = [*(overrides or []), f"select.branch={branch}"]
        _guard(lambda: _execute(config, sets, only=name, force=name if force else None), debug)

    command.__doc__ = f"{_sentence(stage_def(name).help)} (after the stages it needs)."
    app.command(name)(command)


BRANCH_STAGES = ("select", "strip", "export")  # these take --branch
for _stage in STAGES:  # in the runner's order, so `--help` lists the stages as they run
    (_branch_command if _stage.name in BRANCH_STAGES else _stage_command)(_stage.name)


@app.command(help="Train the config's backbone alone (vanilla) and with ONE on the same seeds, and say whether "
                  "ONE's kept branch is better, with a paired significance figure and the cost (writes "
                  "<name>-compare/compare.md). Regimes measured (docs/RESULTS.md): configs/edge.yaml (the "
                  "quickstart: 55,000 images, 2 epochs), configs/edge_small_data_long.yaml (5,000 images, 60 "
                  "epochs), configs/edge_noisy_labels.yaml (the same with 40% of the training labels noisy); "
                  "`one-pipeline gain-map` puts several compares in one table and one plot.")
def compare(config: Path = ConfigArg,
            seeds: str = typer.Option("0,1,2", "--seeds", help="Seeds to train each method with, e.g. 0,1,2"),
            variants: Optional[list[str]] = typer.Option(
                None, "--variant", help="One more ONE method with one field changed, e.g. --variant branches=4 "
                                        "(repeatable)"),
            compress: bool = typer.Option(False, "--compress", help="Then prune both networks (compress section) "
                                          "five ways: does ONE's teacher pay? (writes <name>-compare/compress.md)"),
            overrides: Optional[list[str]] = SetOpt, debug: bool = DebugOpt) -> None:
    from pipeline.compare import compare as run_compare
    from pipeline.compare import parse_seeds

    def both() -> None:
        run_compare(config, overrides or [], parse_seeds(seeds), variants or [], console)
        if compress:
            from pipeline.compare.compress import compress_compare

            compress_compare(config, overrides or [], parse_seeds(seeds), console)

    _guard(both, debug)


@app.command("gain-map")
def gain_map(compares: list[Path] = typer.Argument(..., help="<name>-compare folders or their compare.json"),
             plot: Path = typer.Option(Path("gain_map.png"), "--plot", help="Where the plot goes"),
             debug: bool = DebugOpt) -> None:
    """Where does ONE pay? Several compares side by side: each one's paired gain of the kept branch over
    vanilla with its 95% CI, as a table and one plot (and the gain against the training-set size when
    compares differ only in it for the same images seen)."""
    from pipeline.compare.gain_map import gain_map as draw

    _guard(lambda: console.print(escape(draw(compares, plot)), highlight=False, soft_wrap=True), debug)


@app.command()
def status(config: Path = typer.Argument(DEFAULT_CONFIG, help="YAML config, or a run directory"),
           overrides: Optional[list[str]] = SetOpt, debug: bool = DebugOpt) -> None:
    """Show each stage of a run: done, stale, skipped (with the reason), failed (with the error)."""

    def show() -> None:
        run_dir = config if config.is_dir() else None  # a run directory holds its resolved config
        cfg = load_config(config / "config.yaml" if run_dir else config, overrides or [])
        run = RunDir(run_dir or cfg.run_dir)
        table = Table(title=escape(str(run.root)))
        for column in ("stage", "status", "detail", "wall s"):
            table.add_column(column)
        colours = {"done": "green", "stale": "yellow", "skipped": "yellow", "failed": "red", "missing": "dim"}
        for stage in STAGES:
            try:
                status_, detail = state(cfg, stage, run)
            except PipelineError as exc:
                status_, detail = "corrupted", str(exc)
            entry = run.stage(stage.name)
            wall = entry.wall_s if entry and entry.wall_s is not None else ""
            table.add_row(stage.name, f"[{colours.get(status_, 'red')}]{status_}[/]", escape(detail), str(wall))
        console.print(table)

    _guard(show, debug)


@app.command()
def predict(run_dir: Path = typer.Argument(..., help="A run directory, e.g. artifacts/edge"),
            images: list[str] = typer.Argument(..., help="Image files, folders of images (searched recursively) "
                                               "or quoted glob patterns such as 'photos/**/*.jpg'"),
            model: Optional[str] = typer.Option(None, "--model", help="The exported form: fp32, fp16, int8, "
                                                "int8_cpu, ensemble_fp32, ...; default: the one the bench ships"),
            top: int = typer.Option(5, "--top", min=1, help="How many labels to show per image"),
            output: Optional[Path] = typer.Option(None, "--output", help="Write a CSV: one row per image (path, then "
                                                  "the top-k labels and probabilities)"),
            batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per model call (bounds memory)"),
            max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1, help="Largest image accepted, in "
                                                     "pixels (width x height); default: PIL's bound against "
                                                     "decompression bombs, 89,478,485"),
            debug: bool = DebugOpt) -> None:
    """Classify images with a run's exported model in ONNX Runtime: any mode and size, converted, resized and
    centre-cropped to the model's input with the run's own preprocessing (each image's line says what was done)."""
    from pipeline.deploy.predict import show

    _guard(lambda: show(run_dir, images, console, errors, form=model, top=top, output=output, batch_size=batch_size,
                        max_pixels=max_pixels), debug)


@app.command()
def show_config(config: Path = ConfigArg, overrides: Optional[list[str]] = SetOpt, debug: bool = DebugOpt) -> None:
    """Print the resolved config (defaults filled in) as YAML."""
    _guard(lambda: typer.echo(load_config(config, overrides or []).to_yaml()), debug)


@app.command("config-reference")
def config_reference(write: bool = typer.Option(False, "--write", help="Rewrite docs/CONFIG.md instead of printing"),
                     debug: bool = DebugOpt) -> None:
    """Print every config field with its type, default and meaning (the source of docs/CONFIG.md)."""
    from pipeline.config_reference import REFERENCE_PATH, reference_markdown

    def action() -> None:
        text = reference_markdown()
        if not write:
            typer.echo(text, nl=False)
            return
        REFERENCE_PATH.write_text(text)
        console.print(f"wrote {REFERENCE_PATH}")

    _guard(action, debug)


@app.command("results")
def results(write: bool = typer.Option(False, "--write", help="Rewrite docs/RESULTS.md and the README's key-results "
                                       "table instead of printing"), debug: bool = DebugOpt) -> None:
    """Print every measured table (docs/RESULTS.md) from the JSON records in docs/results/."""
    from pipeline import results as measured

    def action() -> None:
        text = measured.results_markdown()
        if not write:
            typer.echo(text, nl=False)
            return
        measured.RESULTS_PATH.write_text(text)
        readme = measured.README_PATH.read_text()
        measured.README_PATH.write_text(measured.readme_with_key_results(readme))
        console.print(f"wrote {measured.RESULTS_PATH} and the key results in {measured.README_PATH}")

    _guard(action, debug)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
