"""The README's quickstart is what CI runs, and it works on Debian's own Python (PEP 668: no pip outside a venv)."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def quickstart() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    run_command, test_command = quickstart()
    assert test_command in (ROOT / ".ci/run").read_text().splitlines()
    assert "pytest" in test_command and "one-pipeline run configs/edge.yaml" in run_command
    steps = [step.strip() for step in test_command.split("&&")]
    assert steps.index(".venv/bin/ruff check .") < steps.index(".venv/bin/python -m pytest -q")  # CI lints first


def test_quickstart_installs_into_a_virtual_environment():
    for command in quickstart():
        steps = [step.strip() for step in command.split("&&")]
        assert "python3 -m venv .venv" in steps and "apt-get install -y" in command and "python3-venv" in command
        assert not [s for s in steps if s.startswith(("pip ", "python ", "python3 -m pip"))], command


def test_no_file_names_a_file_outside_the_repository():
    """Docs, code and configs cite only files a clone has (not the developers' shared notes)."""
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".toml") and p.is_file()
             and not {".venv", "artifacts", ".git"} & set(p.relative_to(ROOT).parts)]
    cited = [f"{p.relative_to(ROOT)}: {m}" for p in files for m in re.findall(r"shared/[\w./-]+\.md", p.read_text())]
    assert files and not cited


def test_the_readme_is_short_and_names_no_commit():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b", readme)  # hex with letters and digits
    assert not hashes, hashes


def test_every_file_the_readme_links_exists():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#:]+)\)", readme)
    assert links and not [link for link in links if not (ROOT / link).exists()]
