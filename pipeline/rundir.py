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
import functools
import hashlib
import json
import os
import platform
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ArtifactError, PipelineError

TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_path's mkstemp names look like


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give under this process's umask (0644 under 022)."""
    umask = os.umask(0o077)  # the only way to read it is to set it: put it back at once
    os.umask(umask)
    return 0o666 & ~umask


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR,
                errno.EEXIST)


def write_failure(path: Path, exc: OSError) -> PipelineError | OSError:
    """One line for a file that could not be written: disk full, read-only, permissions, not a folder."""
    if exc.errno not in WRITE_ERRORS:
        return exc
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return PipelineError(f"disk full while writing {path}; free some space and run again "
                             "(earlier outputs are intact)")
    return PipelineError(f"cannot write {path} ({exc.strerror or exc}); set output_root to a writable folder and "
                         "run again (earlier outputs are intact)")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes.

    A crash or a full disk leaves the previous file (if any) untouched and no half file behind (a SIGKILL
    leaves the temporary file, which `RunDir.lock` removes at the next start). The rename replaces a
    symlink planted at `path` instead of writing through it. The file gets the umask's mode, not
    mkstemp's 0600, so a server running as another user can read it.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_failure(path, exc) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        error = write_failure(path, exc)
        if error is exc:
            raise
        raise error from None
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


class OutputRecord(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: str  # relative to the run directory
    sha256: str
    bytes: int


class StageRecord(BaseModel):
    """One stage's entry in the manifest, as `RunDir.record` writes it; checked on load so a damaged manifest is
    one message. Frozen: reading a record never changes the manifest. Keys another version of one-pipeline
    wrote (older or newer) are kept as extras, and fields an older version did not write take their defaults."""

    model_config = ConfigDict(extra="allow", frozen=True)
    status: Literal["done", "skipped", "failed"]
    fingerprint: str | None = None  # absent: never up to date
    outputs: dict[str, OutputRecord]
    summary: dict[str, Any] = {}  # the stage's figures (StageResult.summary); empty unless done
    reason: str = ""  # why it was skipped
    error: str = ""  # why it failed
    config: dict[str, Any] = {}  # the resolved config it ran with
    environment: dict[str, Any] = {}  # library versions and hardware (`environment()`)
    device: str | None = None
    wall_s: float | None = None
    finished: str | None = None  # ISO time, UTC

    @property
    def done(self) -> bool:
        return self.status == "done"


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    stages: dict[str, StageRecord]


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
        """An exclusive advisory lock, released by the OS even if the process is killed.

        `.lock` is opened without following a symlink and written only when it is a plain file of its
        own (one link): a planted link can't make a run overwrite another file. Holding the lock, stale
        temporary files of killed writers are removed."""
        lock_path = self.root / ".lock"
        planted = f"{lock_path} is not a lock file this project made (a link or a folder); delete it and run again"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR):
                raise PipelineError(planted) from None
            raise write_failure(lock_path, exc) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise PipelineError(planted)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PipelineError(f"{self.root} is in use by another one-pipeline process; wait for it to "
                                "finish or use another run name (--set name=...)") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.remove_stale_temporaries()
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def remove_stale_temporaries(self) -> None:
        """Temporary files `atomic_path` left behind when its process was killed (call with the lock held)."""
        for folder, _, files in os.walk(self.root):  # does not follow symlinked folders
            for name in files:
                if TEMP_NAME.match(name):
                    Path(folder, name).unlink(missing_ok=True)

    def stage_dir(self, stage: str) -> Path:
        """A stage's output folder; a symlink planted in its place is refused, never written through."""
        path = self.path(stage)
        if path.is_symlink():
            raise PipelineError(f"{path} is a symlink; outputs are written only inside the run directory: "
                                "delete it and run again")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failure(path, exc) from None
        return path

    # --- manifest -----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The manifest as JSON data (what `record` and `forget` rewrite), checked like `stages`."""
        return self._load()[0]

    def stages(self) -> dict[str, StageRecord]:
        """Every recorded stage's typed record."""
        return self._load()[1].stages

    def stage(self, name: str) -> StageRecord | None:
        """A stage's record; None when it has not run. Stages read others through `StageContext.record`."""
        return self.stages().get(name)

    def _load(self) -> tuple[dict[str, Any], Manifest]:
        if not self.manifest_path.exists():
            return {"stages": {}}, Manifest(stages={})
        cheap_fix = (f"delete {self.manifest_path} alone and run again (every stage is re-checked and training "
                     "resumes from train/last.pt)")
        try:
            data = json.loads(self.manifest_path.read_text())
            return data, Manifest.model_validate(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError(f"{self.manifest_path} is corrupted; {cheap_fix}") from None
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.errors()[0]["loc"])
            raise ArtifactError(f"{self.manifest_path} is not a one-pipeline manifest ({where}: "
                                f"{exc.errors()[0]['msg']}); {cheap_fix}") from None

    def record(self, name: str, entry: dict[str, Any]) -> None:
        manifest = self.manifest()
        entry = {**entry, "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        manifest["stages"][name] = entry
        write_json(self.manifest_path, manifest)

    def forget(self, name: str) -> None:
        manifest = self.manifest()
        if manifest["stages"].pop(name, None) is not None:
            write_json(self.manifest_path, manifest)

    def recorded_path(self, relative: str) -> Path:
        """A path the manifest records, refused unless it stays inside the run directory."""
        path = self.root / relative
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ArtifactError(f"{self.manifest_path} records {relative!r}, outside the run directory; it will "
                                f"not be read: delete {self.manifest_path} and run again")
        return path

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
        if entry is None or not entry.done:
            raise ArtifactError(f"stage '{stage}' has not finished in {self.root}; run it first "
                                f"(one-pipeline run CONFIG --until {stage})")
        if key not in entry.outputs:
            raise ArtifactError(f"stage '{stage}' recorded no output '{key}' in {self.root}")
        record = entry.outputs[key]
        path = self.recorded_path(record.path)
        if not path.exists():
            raise ArtifactError(f"{path} is missing; rerun with --from {stage}")
        if sha256_file(path) != record.sha256:
            raise ArtifactError(f"{path} does not match the sha256 recorded when '{stage}' wrote it "
                                f"(truncated or modified); rerun with --from {stage}")
        return path
