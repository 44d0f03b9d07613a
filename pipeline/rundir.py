"""The run directory: atomic writes, the manifest of finished stages, sha256 checks and the lock.

Every output of a run lives under `<output_root>/<name>/`. `manifest.json` records, per stage, its
status, the fingerprint it ran with (config digest + input digests), its outputs with sha256, a
summary of figures, library versions, device and wall time. Later stages find their inputs only
through the manifest, and every input is checked against its recorded sha256 before use.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import ArtifactError, PipelineError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes.

    A crash or a full disk leaves the previous file (if any) untouched and no half file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise PipelineError(f"disk full while writing {path}; free some space and run again "
                                "(earlier outputs are intact)") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def cpu_model() -> str:
    """The CPU's model name (as lscpu shows it): timings are only comparable on the same CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Library versions and hardware, recorded with every stage."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for module in ("onnx", "onnxruntime", "tensorrt"):
        try:
            env[module] = __import__(module).__version__
        except Exception:  # absent or broken optional library: recorded as absent
            env[module] = None
    return env


class RunDir:
    """A run's folder and its manifest. Only one process may hold it at a time (see `lock`)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self._lock_file = None

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # --- lock -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive advisory lock, released by the OS even if the process is killed."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise PipelineError(f"{self.root} is in use by another one-pipeline process; wait for it to "
                                "finish or use another run name (--set name=...)") from None
        try:
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    # --- manifest -----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"stages": {}}
        try:
            data = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError(f"{self.manifest_path} is corrupted; delete the run directory or use another "
                                "run name") from None
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise ArtifactError(f"{self.manifest_path} is not a one-pipeline manifest; use another run name")
        return data

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.manifest()["stages"].get(name)

    def record(self, name: str, entry: dict[str, Any]) -> None:
        manifest = self.manifest()
        entry = {**entry, "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        manifest["stages"][name] = entry
        write_json(self.manifest_path, manifest)

    def forget(self, name: str) -> None:
        manifest = self.manifest()
        if manifest["stages"].pop(name, None) is not None:
            write_json(self.manifest_path, manifest)

    def describe_outputs(self, outputs: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """{name: {path (relative to the run), sha256, bytes}} for the manifest."""
        described = {}
        for key, path in outputs.items():
            path = Path(path)
            described[key] = {
                "path": str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path),
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
            }
        return described

    def output(self, stage: str, key: str) -> Path:
        """The path of an earlier stage's output, after checking it against the manifest's sha256."""
        entry = self.stage(stage)
        if entry is None or entry.get("status") != "done":
            raise ArtifactError(f"stage '{stage}' has not finished in {self.root}; run it first "
                                f"(one-pipeline run CONFIG --until {stage})")
        if key not in entry["outputs"]:
            raise ArtifactError(f"stage '{stage}' recorded no output '{key}' in {self.root}")
        record = entry["outputs"][key]
        path = self.root / record["path"]
        if not path.exists():
            raise ArtifactError(f"{path} is missing; rerun with --force {stage}")
        if sha256_file(path) != record["sha256"]:
            raise ArtifactError(f"{path} does not match the sha256 recorded when '{stage}' wrote it "
                                f"(truncated or modified); rerun with --force {stage}")
        return path
