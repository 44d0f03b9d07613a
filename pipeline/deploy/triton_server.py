"""A real Triton Inference Server on this machine: its environment, the stand-in backend, start and stop.

NVIDIA's `nvidia-pytriton` wheel bundles a real `tritonserver` binary with only the python backend. The
server runs from an environment of its own (a virtual environment beside the project's: the python
backend's stub needs numpy < 2, the project needs numpy >= 2), created once by `setup_env()` under
`~/.cache/one-pipeline/triton-server/<key>/`, the key being a hash of the pinned requirements and the
Python version (`ONE_PIPELINE_TRITON_ENV` names another folder). Its backend directory holds the bundled
python backend and `onnxruntime/model.py`, a *stand-in* for Triton's C++ onnxruntime backend (see
pipeline/deploy/triton_standin_backend/), so the run's unchanged repository loads. That directory is
named after a hash of the stand-in's files and made again whenever they change: a server always runs
the checkout's stand-in, never a copy of an older one.

    python -m pipeline.deploy.triton_server setup     # create the environment (about 30 s and 450 MB)

`TritonServer` starts `tritonserver` on loopback ports chosen free at run time and stops it by its PID.
`ONE_PIPELINE_TRITONSERVER="<command>"` makes `serve()` start that command instead (e.g. NVIDIA's
container with the real backends on a GPU host, docs/DEPLOY.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from pathlib import Path
from typing import Iterator

from pipeline.errors import PipelineError, StageSkipped

# pinned: the versions the server test passed with. numpy < 2: the python backend stub of tritonserver
# 2.51 answers "output tensor shape does not match size of output" with numpy 2.
REQUIREMENTS = ("nvidia-pytriton==0.7.0", "numpy==1.26.4", "onnxruntime==1.32.0")
ENV_VARIABLE = "ONE_PIPELINE_TRITON_ENV"
COMMAND_VARIABLE = "ONE_PIPELINE_TRITONSERVER"
SETUP_COMMAND = "python -m pipeline.deploy.triton_server setup"
STANDIN_BACKEND = Path(__file__).parent / "triton_standin_backend"
STANDIN_FOR = ("onnxruntime", "openvino")  # the C++ backends the stand-in takes the place of
COMPLETE = ".complete"  # written last: an environment without it is unfinished


@dataclasses.dataclass(frozen=True)
class ServerEnv:
    """A finished server environment."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def pytriton(self) -> Path:
        return next((self.root / "venv" / "lib").glob("python3*/site-packages/pytriton"))

    @property
    def tritonserver(self) -> Path:
        return self.pytriton / "tritonserver" / "bin" / "tritonserver"

    @property
    def libraries(self) -> Path:
        """The wheel's bundled libraries; the copied stub no longer finds them through its rpath."""
        return self.pytriton.parent / "nvidia_pytriton.libs"

    @property
    def backends(self) -> Path:
        return self.root / f"backends-{standin_digest()}"


def standin_digest() -> str:
    """A hash of the stand-in backend's files (names and bytes) and of the backends it stands in for."""
    digest = hashlib.sha256("\0".join(STANDIN_FOR).encode())
    for path in sorted(p for p in STANDIN_BACKEND.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(f"{path.relative_to(STANDIN_BACKEND)}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def env_root() -> Path:
    if os.environ.get(ENV_VARIABLE):
        return Path(os.environ[ENV_VARIABLE]).expanduser()
    key = hashlib.sha256("\n".join([sys.version.split()[0], *REQUIREMENTS]).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "one-pipeline" / "triton-server" / key


def find_env() -> ServerEnv | None:
    """The finished environment (with the current stand-in backend), or None."""
    root = env_root()
    return setup_env() if (root / COMPLETE).is_file() else None


def missing_env_reason() -> str:
    return f"the Triton server environment is not set up in {env_root()}: run `{SETUP_COMMAND}`"


def setup_env(*, timeout_s: float = 900) -> ServerEnv:
    """Create the environment once (idempotent; concurrent callers wait for the first one). PipelineError
    with a one-line reason when it cannot be made (no network, no wheel for this platform, timeout)."""
    root = env_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest workers set up one environment, not one each
        env = ServerEnv(root)
        if not (root / COMPLETE).is_file():
            for leftover in (root / "venv", *root.glob("backends*")):
                shutil.rmtree(leftover, ignore_errors=True)  # from a setup that was interrupted
            venv.EnvBuilder(with_pip=True).create(root / "venv")
            _pip_install(env.python, timeout_s)
            (root / COMPLETE).write_text("\n".join(REQUIREMENTS) + "\n")
        if not env.backends.is_dir():  # new environment, or the stand-in changed since the last server
            _write_backends(env)
        return env


def _pip_install(python: Path, timeout_s: float) -> None:
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PipelineError(f"installing the Triton server environment took over {timeout_s:.0f} s: "
                            f"{' '.join(REQUIREMENTS)}") from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()
        raise PipelineError(f"pip could not install the Triton server environment ({' '.join(REQUIREMENTS)}): "
                            f"{(errors or ['no message'])[-1].strip()}")


def _write_backends(env: ServerEnv) -> None:
    """python/: the bundled python backend with the stub for this Python; onnxruntime/ and openvino/: the
    stand-in (for openvino too: it checks that the repository's openvino models load and answer, with ONNX
    Runtime's numerics, not OpenVINO's). Copies, not links: Triton and the loader resolve paths next to
    these files. Made aside and renamed into place, so a server never sees a half-written directory."""
    building = Path(tempfile.mkdtemp(prefix=".backends-", dir=env.root))
    try:
        python_backend = building / "python"
        shutil.copytree(env.pytriton / "tritonserver" / "backends" / "python", python_backend)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = env.pytriton / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise PipelineError(f"nvidia-pytriton has no python backend stub for Python {version}")
        shutil.copy2(stub, python_backend / "triton_python_backend_stub")
        for backend in STANDIN_FOR:
            shutil.copytree(STANDIN_BACKEND / "onnxruntime", building / backend,
                            ignore=shutil.ignore_patterns("__pycache__"))
        building.rename(env.backends)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Endpoints:
    http: str  # host:port
    grpc: str
    backend: str  # what serves the ONNX models, for reports


class TritonServer:
    """One tritonserver process on 127.0.0.1, started on `repository`, stopped by its PID.

    env: run the environment's tritonserver with its backend directory (the stand-in onnxruntime backend);
    command: run this command line instead, e.g. NVIDIA's container with the real backends (docs/DEPLOY.md).
    models: load only these (--model-control-mode=explicit); None: every model in the repository.
    cpu_only: serve a repository that holds a KIND_GPU plan model on a machine without a GPU: the plan
    model fails to load and the others are served (--exit-on-error=false), and the server reports ready
    once it is up (--strict-readiness=false; ask each model's readiness instead).
    """

    def __init__(self, repository: Path, *, env: ServerEnv | None = None, command: list[str] | None = None,
                 models: list[str] | None = None, cpu_only: bool = False, log: Path | None = None):
        if (env is None) == (command is None):
            raise ValueError("TritonServer needs exactly one of env and command")
        self.repository, self.env, self.base_command = Path(repository), env, command
        self.models, self.cpu_only = models, cpu_only
        self.log = log or Path(tempfile.mkdtemp(prefix="tritonserver-")) / "server.log"
        self.process: subprocess.Popen | None = None
        self.endpoints: Endpoints | None = None

    def command(self, http_port: int, grpc_port: int) -> list[str]:
        flags = [f"--model-repository={self.repository}",
                 "--http-address=127.0.0.1", f"--http-port={http_port}",
                 "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
                 "--exit-timeout-secs=5",  # on SIGTERM, wait this long for clients still connected
                 "--allow-metrics=false", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false"]
        if self.models is not None:
            flags += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models)]
        if self.cpu_only:
            flags += ["--exit-on-error=false", "--strict-readiness=false"]
        if self.base_command is not None:
            return [*self.base_command, *flags]
        # python backend shared-memory regions are named per server: concurrent servers stay apart
        return [str(self.env.tritonserver), *flags, f"--backend-directory={self.env.backends}",
                f"--backend-config=python,shm-region-prefix-name=one-pipeline-{os.getpid()}-{http_port}"]

    def environment(self) -> dict[str, str]:
        """The stub embeds libpython: take the one of the Python the environment was made with, and find
        the environment's numpy and onnxruntime through its python first on PATH."""
        env = dict(os.environ)
        if self.env is None:
            return env
        libraries = [sysconfig.get_config_var("LIBDIR") or "", str(self.env.libraries), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
        env["PATH"] = os.pathsep.join([str(self.env.python.parent), env.get("PATH", "")])
        env.pop("PYTHONPATH", None)  # the project's packages (numpy 2) must not reach the stub
        return env

    def start(self, *, timeout_s: float = 120, attempts: int = 3) -> Endpoints:
        """Start and wait until the server is ready; a port taken between choosing and binding it gives a
        new attempt on other ports."""
        for _ in range(attempts):
            http_port, grpc_port = free_port(), free_port()
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "w") as log:
                self.process = subprocess.Popen(self.command(http_port, grpc_port), stdout=log,
                                                stderr=subprocess.STDOUT, env=self.environment(),
                                                start_new_session=True)  # its stubs stop with it
            backend = ("the test stand-in onnxruntime backend (ONNX Runtime, CPU)" if self.env is not None
                       else f"started with {shlex.join(self.base_command)}")
            self.endpoints = Endpoints(f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", backend)
            if self._wait_ready(timeout_s):
                return self.endpoints
            self.stop()
            if "ddress already in use" not in self.log.read_text(errors="replace"):
                break
        raise PipelineError(f"tritonserver did not become ready: {self.failure()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if server_ready(self.endpoints.http):
                return True
            time.sleep(0.2)
        return False

    def failure(self) -> str:
        """The server's last error line (the fatal one; or its exit status), for a one-line reason."""
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        errors = [line.strip() for line in text.splitlines() if line.startswith("E") or "error" in line.lower()]
        status = self.process.poll() if self.process else None
        where = f"exit status {status}" if status is not None else "still starting"
        return f"{errors[-1] if errors else 'no error in its log'} ({where}; log {self.log})"

    def stop(self, *, timeout_s: float = 20) -> None:
        """SIGTERM (Triton unloads its models and stops its stubs), then SIGKILL to the whole group."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def server_ready(http_url: str) -> bool:
    import tritonclient.http as httpclient  # outside the try: a missing client is an error, not "not ready"

    client = httpclient.InferenceServerClient(http_url, connection_timeout=2, network_timeout=2)
    try:
        return client.is_server_ready()
    except Exception:  # refused while starting: not ready yet
        return False
    finally:  # here: one left to the garbage collector can be closed from another thread, which gevent refuses
        client.close()


def external_command() -> list[str] | None:
    """ONE_PIPELINE_TRITONSERVER: a command line that starts tritonserver (flags are appended), used
    instead of the environment's binary and the stand-in backend."""
    value = os.environ.get(COMMAND_VARIABLE, "").strip()
    return shlex.split(value) if value else None


@contextlib.contextmanager
def serve(repository: Path, *, models: list[str] | None = None, cpu_only: bool = False,
          log: Path | None = None) -> Iterator[Endpoints]:
    """A server on `repository` for the duration of the block: ONE_PIPELINE_TRITONSERVER's command, else
    the finished environment's binary (StageSkipped with the setup command when there is none)."""
    command = external_command()
    env = None if command else find_env()
    if command is None and env is None:
        raise StageSkipped(missing_env_reason())
    with TritonServer(repository, env=env, command=command, models=models, cpu_only=cpu_only, log=log) as server:
        yield server.endpoints


def main(argv: list[str]) -> int:
    if argv != ["setup"]:
        print(f"usage: {SETUP_COMMAND}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        env = setup_env()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Triton server environment ready in {env.root} ({time.monotonic() - started:.0f} s): {env.tritonserver}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
