"""Pick the branch to deploy: the best validation accuracy (never the test set), or the user's index.

    index, reason = choose_branch([91.2, 92.5, 92.5], "best")   # -> 1 (ties go to the lowest index)

Reads train's summary only (`val` / `test` accuracies in %); writes select/selection.json with every
branch's validation and test accuracy, the teacher's, and the choice. Summary: `branch`, `reason`,
`val` and `test` (the chosen branch's accuracies, %), `method`.
"""

from __future__ import annotations

from typing import Any, Sequence

from pipeline.errors import ArtifactError, UsageError
from pipeline.rundir import write_json
from pipeline.stage import StageContext, StageResult


def choose_branch(val_accuracies: Sequence[float], choice: str | int = "best") -> tuple[int, str]:
    """(index, reason): the user's index if `choice` is an int, else the best validation accuracy
    with ties to the lowest index. An index out of range is a UsageError naming the valid ones."""
    count = len(val_accuracies)
    if count == 0:
        raise ArtifactError("train recorded no branch accuracies; rerun with --from train")
    if isinstance(choice, int):
        if not 0 <= choice < count:
            valid = f"branches {', '.join(map(str, range(count)))}" if count > 1 else "only branch 0"
            raise UsageError(f"select.branch {choice} is out of range; this model has {valid}")
        return choice, f"select.branch = {choice} (set by the user)"
    if count == 1:
        return 0, "one network (vanilla): the only choice"
    best = max(range(count), key=lambda i: (val_accuracies[i], -i))
    tied = [i for i in range(count) if val_accuracies[i] == val_accuracies[best]]
    note = f"; tied with {', '.join(map(str, tied[1:]))}, the lowest index wins" if len(tied) > 1 else ""
    return best, f"best validation accuracy ({val_accuracies[best]:.2f} %) of {count} branches{note}"


def run(ctx: StageContext) -> StageResult:
    train = ctx.summary("train")
    try:
        val, test = train["val"], train["test"]
        val_branches, test_branches = list(val["branches"]), list(test["branches"])
    except (KeyError, TypeError):
        raise ArtifactError("train's summary has no validation/test accuracies in the manifest; rerun with "
                            "--from train") from None
    method = train.get("method", "one")
    if method == "vanilla" and len(val_branches) != 1:
        raise ArtifactError(f"train's summary says vanilla but lists {len(val_branches)} networks; rerun with "
                            "--from train")
    index, reason = choose_branch(val_branches, ctx.cfg.select.branch)
    selection: dict[str, Any] = {
        "branch": index,
        "reason": reason,
        "method": method,
        "branches": [{"index": i, "val": v, "test": t} for i, (v, t) in enumerate(zip(val_branches, test_branches))],
        "teacher": {"val": val.get("teacher"), "test": test.get("teacher")} if "teacher" in val else None,
        "chosen": {"val": val_branches[index], "test": test_branches[index]},
    }
    path = ctx.stage_dir("select") / "selection.json"
    write_json(path, selection)
    ctx.console.print(f"branch {index}: {reason}; val {val_branches[index]:.2f} %, test {test_branches[index]:.2f} %")
    return StageResult(outputs={"selection": path},
                       summary={"branch": index, "reason": reason, "method": method, "val": val_branches[index],
                                "test": test_branches[index]})
