"""Static checks of the production Docker stack (docker/): no Docker engine needed.

They read docker/compose.yaml, the Dockerfiles, docker/postgres-init.sql, docker/.env.example and
pyproject.toml, and look for what would break `docker compose up` or leak a secret: a missing
build file, a command its image cannot run, a URL to a service or port that is not there, a port
open beyond loopback, a credential written inline, a variable .env.example does not mention.

Each check is a function that returns a list of problems. A test asserts the real files give
none; the `*_can_fail` tests feed each check a broken copy, so a check that can no longer fail
shows up.
"""
from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_PATH = DOCKER / "compose.yaml"
ENV_EXAMPLE_PATH = DOCKER / ".env.example"

SERVICES = {"minio", "minio-init", "postgres", "mlflow", "prefect-server", "worker"}
NOT_SHIPPED = {"tests", "docs", "docker"}  # top-level folders the worker image need not carry
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_USER$")
# The environment each service must get (names the entcal code and the servers read).
REQUIRED_ENV = {
    "worker": {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "ENTCAL_S3_ENDPOINT_URL",
               "ENTCAL_BUCKET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_DEFAULT_REGION"},
    "mlflow": {"MLFLOW_S3_ENDPOINT_URL", "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "prefect-server": {"PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_ANALYTICS_ENABLED"},
}
EXECUTABLE_PACKAGE = {"mlflow": "mlflow", "prefect": "prefect"}  # console script -> pip package
DEFAULT_PORTS = {"postgres": {5432}}  # listening ports of services that publish none
# Compose interpolation: "$$" (an escaped dollar), ${NAME}, ${NAME:-default}, ${NAME:?err}, $NAME.
INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
)


# ---------------------------------------------------------------- reading the files

def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_PATH.read_text())


def variables(text: str) -> dict[str, bool]:
    """Every ${VAR} in `text` -> whether each use has a default (so .env need not set it)."""
    found: dict[str, bool] = {}
    for m in INTERPOLATION.finditer(text):
        if name := m["name"] or m["bare"]:
            has_default = (m["op"] or "").lstrip(":") in ("-", "+")
            found[name] = found.get(name, True) and has_default
    return found


def resolve(value) -> str:
    """`value` as Compose would interpolate it with an empty .env: defaults, else the name."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m["op"] and m["op"].lstrip(":") == "-":
            return m["arg"]
        return m["name"] or m["bare"]
    return INTERPOLATION.sub(sub, str(value))


def as_argv(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def strings(node):
    """Every scalar string in a parsed YAML tree (keys included)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def dockerfile_of(service: dict) -> tuple[Path, Path]:
    build = service["build"]
    build = {"context": build} if isinstance(build, str) else build
    context = (DOCKER / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def instructions(dockerfile_text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in dockerfile_text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in (ln.strip() for ln in joined.splitlines()) if ln]


def pip_installs(dockerfile_text: str) -> list[str]:
    """Arguments of every `pip install` in RUN lines: requirement strings or paths."""
    takes_value = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url",
                   "--extra-index-url", "-f", "--find-links", "-t", "--target"}
    found = []
    for op, args in instructions(dockerfile_text):
        if op != "RUN":
            continue
        for part in re.split(r"&&|;|\|\|", args):
            words = shlex.split(part)
            if "pip" not in " ".join(words[:4]) or "install" not in words:
                continue
            rest, skip = words[words.index("install") + 1:], False
            for w in rest:
                if skip:
                    skip = False
                elif w in takes_value:
                    skip = True
                elif not w.startswith("-"):
                    found.append(w)
    return found


def package_name(requirement: str) -> str:
    name = re.split(r"[\[<>=!~;@ ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_packages(dockerfile_text: str) -> set[str]:
    """Packages the image gets from pip; "." (the repo) adds pyproject.toml's dependencies."""
    names = set()
    for arg in pip_installs(dockerfile_text):
        if arg in (".", "./"):
            pyproject = ROOT / "pyproject.toml"
            if pyproject.exists():
                deps = tomllib.loads(pyproject.read_text())["project"].get("dependencies", [])
                names |= {package_name(d) for d in deps}
        else:
            names.add(package_name(arg))
    return names


def container_ports(name: str, service: dict) -> set[int]:
    ports = set(DEFAULT_PORTS.get(name, ()))
    for p in service.get("ports") or []:
        target = p["target"] if isinstance(p, dict) else resolve(p).split("/")[0].split(":")[-1]
        ports.add(int(target))
    return ports | {int(p) for p in service.get("expose") or []}


# ---------------------------------------------------------------- the checks

def check_builds(compose: dict) -> list[str]:
    problems = []
    for name, svc in compose["services"].items():
        if "build" in svc:
            context, dockerfile = dockerfile_of(svc)
            if not context.is_dir():
                problems.append(f"{name}: build context {context} does not exist")
            if not dockerfile.is_file():
                problems.append(f"{name}: Dockerfile {dockerfile} does not exist")
        elif "image" not in svc:
            problems.append(f"{name}: neither image nor build")
        elif ":" not in svc["image"] or svc["image"].endswith(":latest"):
            problems.append(f"{name}: image {svc['image']} is not pinned to a tag")
    return problems


def check_depends_on(compose: dict) -> list[str]:
    services, problems = compose["services"], []
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        deps = {d: {} for d in deps} if isinstance(deps, list) else deps
        for target, spec in deps.items():
            condition = (spec or {}).get("condition", "service_started")
            if target not in services:
                problems.append(f"{name}: depends on unknown service {target}")
            elif condition == "service_healthy" and "healthcheck" not in services[target]:
                problems.append(f"{name}: waits for {target} to be healthy; it has no healthcheck")
            elif condition == "service_completed_successfully" and str(
                    services[target].get("restart", "no")) != "no":
                problems.append(f"{name}: waits for one-shot {target}, which restarts")
            elif condition not in ("service_started", "service_healthy",
                                   "service_completed_successfully"):
                problems.append(f"{name}: unknown condition {condition}")
    return problems


def missing_packages(argv: list[str], env: dict, dockerfile_text: str) -> list[str]:
    """What a built image must pip-install to run `argv` with `env`, and does not."""
    have = installed_packages(dockerfile_text)
    need = {EXECUTABLE_PACKAGE.get(argv[0], argv[0])} if argv else set()
    text = " ".join(argv) + " " + " ".join(map(str, env.values()))
    if "postgresql://" in text:
        need.add("psycopg2-binary" if "psycopg2-binary" in have else "psycopg2")
    if "s3://" in text or any(k.endswith("S3_ENDPOINT_URL") for k in env):
        need.add("boto3")
    if "MLFLOW_TRACKING_URI" in env:
        need.add("mlflow")
    return sorted(need - have)


def check_commands(compose: dict) -> list[str]:
    """Each service's command (and healthcheck) runs a program its image has."""
    problems = []
    for name, svc in compose["services"].items():
        argv = as_argv(svc.get("entrypoint")) + as_argv(svc.get("command"))
        health = as_argv((svc.get("healthcheck") or {}).get("test"))
        health_exe = (health[1:2] if health[:1] == ["CMD"] else
                      health[1].split()[:1] if health[:1] == ["CMD-SHELL"] else health[:1])
        image = svc.get("image", "")
        if "build" in svc:
            _, dockerfile = dockerfile_of(svc)
            text = dockerfile.read_text() if dockerfile.is_file() else ""
            problems += [f"{name}: image from {dockerfile.name} does not pip-install {p}"
                         for p in missing_packages(argv, environment(svc), text)]
            if health_exe == ["python"] and not re.search(r"^FROM\s+python:", text, re.M):
                problems.append(f"{name}: healthcheck runs python; the base image is not python")
        elif image.startswith("prefecthq/prefect:"):
            if argv[:1] != ["prefect"] or health_exe not in ([], ["python"]):
                problems.append(f"{name}: prefect image runs {argv[:1]} / check {health_exe}")
        elif image.startswith("minio/minio:"):
            # The image's entrypoint runs `minio "$@"`; its healthcheck tool is the bundled mc.
            if argv[:1] != ["server"] or health_exe not in ([], ["mc"]):
                problems.append(f"{name}: minio image runs {argv[:1]} / check {health_exe}")
        elif image.startswith("minio/mc:"):
            runs_mc = re.search(r"\bmc ", " ".join(argv))
            if argv[:1] not in (["mc"], ["/bin/sh"], ["sh"]) or not runs_mc:
                problems.append(f"{name}: mc image must run mc, got {argv[:2]}")
        elif image.startswith("postgres:"):
            if argv[:1] not in ([], ["postgres"]) or health_exe not in ([], ["pg_isready"]):
                problems.append(f"{name}: postgres image runs {argv[:1]} / check {health_exe}")
        else:
            problems.append(f"{name}: no rule for image {image!r}: teach check_commands about it")
    return problems


def check_ports(compose: dict) -> list[str]:
    problems = []
    for name, svc in compose["services"].items():
        for p in svc.get("ports") or []:
            host_ip = p.get("host_ip", "") if isinstance(p, dict) else (
                resolve(p).split("/")[0].rsplit(":", 2)[0] if resolve(p).count(":") == 2 else "")
            if host_ip != "127.0.0.1":
                problems.append(f"{name}: port {p!r} binds {host_ip or 'every interface'}")
    return problems


def check_credentials(compose: dict, text: str) -> list[str]:
    """Secrets only as ${VAR} without a literal default; URLs carry no literal user:password."""
    problems = []
    for name, svc in compose["services"].items():
        for key, value in environment(svc).items():
            if isinstance(value, bool):
                problems.append(f"{name}: {key} is a YAML bool; Compose wants a string")
            if SECRET_NAME.search(key) and value is not None:
                m = INTERPOLATION.fullmatch(str(value).strip())
                if not (m and m["name"] and (m["op"] is None or m["op"].endswith("?")
                                             or not m["arg"])):
                    problems.append(f"{name}: {key} is not a bare ${{VAR}} reference")
    for s in strings(compose):
        for url in re.findall(r"\w[\w+.-]*://[^\s\"']+", s):
            userinfo = urlsplit(url).netloc.rpartition("@")[0]
            for part in filter(None, userinfo.split(":", 1) if userinfo else []):
                if not re.fullmatch(r"\$\{\w+(:?\?[^}]*)?\}", part):
                    problems.append(f"literal credential in URL {url}")
                    break
    if re.search(r"(SECRET_ACCESS_KEY|PASSWORD)\s*[=:]\s*[\"']?[A-Za-z0-9/+]{8,}", text):
        problems.append("something shaped like an inline secret")
    return problems


def check_service_urls(compose: dict) -> list[str]:
    """http://host:port and postgresql://...@host:port in env point at a service that listens."""
    services, problems = compose["services"], []
    for name, svc in services.items():
        for key, value in environment(svc).items():
            for url in re.findall(r"\w[\w+.-]*://[^\s,]+", resolve(value or "")):
                parts = urlsplit(url)
                if parts.scheme == "s3" or parts.hostname in ("127.0.0.1", "localhost"):
                    continue
                if parts.hostname not in services:
                    problems.append(f"{name}: {key} points at unknown host {parts.hostname}")
                elif parts.port not in container_ports(parts.hostname, services[parts.hostname]):
                    problems.append(f"{name}: {key}: {parts.hostname} has no port {parts.port}")
    return problems


def check_env_example(compose: dict, env_example: str) -> list[str]:
    """Each ${VAR} (comments aside) is in .env.example, set if required; no real secrets."""
    compose_text = "\n".join(strings(compose))
    active = dict(ln.split("=", 1) for ln in env_example.splitlines()
                  if re.match(r"^\w+=", ln))
    problems = []
    for var, has_default in sorted(variables(compose_text).items()):
        if not has_default and var not in active:
            problems.append(f"{var} is required by compose.yaml but not set in .env.example")
        elif not re.search(rf"^#?\s*{var}=", env_example, re.M):
            problems.append(f"{var} (optional) is not mentioned in .env.example")
    for key, value in active.items():
        if re.search(r"PASSWORD|SECRET|TOKEN", key) and value not in ("", "change-me"):
            problems.append(f".env.example: {key} holds {value!r}, not the placeholder change-me")
    return problems


# ---------------------------------------------------------------- tests on the real files

@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def test_compose_static_parses_with_every_service(compose):
    assert set(compose["services"]) == SERVICES


@pytest.mark.parametrize("check", [check_builds, check_depends_on, check_commands, check_ports,
                                   check_service_urls])
def test_compose_static_check_passes(compose, check):
    assert check(compose) == []


def test_compose_static_no_literal_credentials(compose):
    assert check_credentials(compose, COMPOSE_PATH.read_text()) == []


def test_compose_static_env_example_lists_every_variable():
    assert check_env_example(load_compose(), ENV_EXAMPLE_PATH.read_text()) == []


def test_compose_static_services_get_their_environment(compose):
    services = compose["services"]
    for name, needed in REQUIRED_ENV.items():
        assert needed <= set(environment(services[name])), name
    worker = {k: resolve(v) for k, v in environment(services["worker"]).items()}
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["ENTCAL_S3_ENDPOINT_URL"] == "http://minio:9000"
    mlflow = {k: resolve(v) for k, v in environment(services["mlflow"]).items()}
    assert mlflow["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE"] == "path"
    prefect = environment(services["prefect-server"])
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert prefect["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_compose_static_prefect_ui_is_told_the_api_url_the_browser_uses(compose):
    """The UI's /ui-settings api_url must be the host's published API address, in a setting Prefect reads."""
    from prefect.settings.models.server.ui import ServerUISettings

    server = compose["services"]["prefect-server"]
    names = ServerUISettings.model_fields["api_url"].validation_alias.choices
    readable = {n.upper() for n in names if isinstance(n, str)}
    (key,) = [k for k in environment(server) if k in readable]
    published = {p.rsplit(":", 2)[-2]: p.rsplit(":", 1)[-1] for p in map(resolve, server["ports"])}
    container_port = as_argv(server["command"])[as_argv(server["command"]).index("--port") + 1]
    host_port = next(h for h, c in published.items() if c == container_port)
    assert resolve(environment(server)[key]) == f"http://127.0.0.1:{host_port}/api"


def test_compose_static_mlflow_stores_in_postgres_and_the_bucket(compose):
    services = compose["services"]
    mlflow = services["mlflow"]
    argv = [resolve(a) for a in as_argv(mlflow["command"])]
    assert argv[:2] == ["mlflow", "server"] and "--host=0.0.0.0" in argv
    bucket = resolve(environment(services["worker"])["ENTCAL_BUCKET"])
    assert resolve(environment(services["minio-init"])["ENTCAL_BUCKET"]) == bucket
    assert f"--artifacts-destination=s3://{bucket}/mlflow" in argv
    backend = resolve(environment(mlflow).get("MLFLOW_BACKEND_STORE_URI", ""))
    backend = backend or next(a.split("=", 1)[1] for a in argv
                              if a.startswith("--backend-store-uri="))
    assert backend.startswith("postgresql://")
    prefect_env = environment(services["prefect-server"])
    prefect_db = resolve(prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"])
    init_sql = (DOCKER / "postgres-init.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+)", init_sql))
    assert {urlsplit(backend).path.strip("/"), urlsplit(prefect_db).path.strip("/")} == created
    mounts = services["postgres"]["volumes"]
    assert any(m.startswith("./postgres-init.sql:/docker-entrypoint-initdb.d/") for m in mounts)


def test_compose_static_mlflow_accepts_the_host_names_clients_use(compose):
    """MLflow >= 3.5 answers 403 to Host headers it does not allow (DNS-rebinding guard)."""
    allowed = resolve(environment(compose["services"]["mlflow"]).get(
        "MLFLOW_SERVER_ALLOWED_HOSTS", "")).split(",")
    for host in ("mlflow:5000", "127.0.0.1:5000", "localhost:5000"):
        assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), host


def test_compose_static_worker_reserves_a_gpu(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_compose_static_worker_dockerfile_installs_the_repo(compose):
    context, dockerfile = dockerfile_of(compose["services"]["worker"])
    assert context == ROOT
    text = dockerfile.read_text()
    assert "." in pip_installs(text) or "./" in pip_installs(text)
    copied = [src for op, args in instructions(text) if op == "COPY"
              for src in [a for a in shlex.split(args) if not a.startswith("--")][:-1]]
    missing = [src for src in copied if not (context / src).exists()]
    assert missing == [], f"COPY sources missing from the repository: {missing}"
    shipped = {d.name for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".")
               and d.name not in NOT_SHIPPED and any(d.glob("*.py"))}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject.get("tool", {}).get("setuptools", {})
    folders = setuptools.get("package-dir", {})  # entcal.flows -> flows: the folders the packages install from
    shipped |= {folders.get(p, p) for p in setuptools.get("packages", [])}
    shipped |= {"pyproject.toml"} | set(re.findall(r"(?:-c|--constraint)[ =](\S+)", text))
    assert shipped - set(copied) == set(), "what `pip install .` needs and the image leaves out"


def test_compose_static_worker_image_gets_prefect_from_pyproject():
    """The worker's `prefect` comes from `pip install .`: pyproject.toml must depend on it."""
    assert (ROOT / "pyproject.toml").is_file(), "pyproject.toml is missing"
    assert {"prefect", "mlflow", "boto3"} <= installed_packages((DOCKER / "Dockerfile").read_text())


def test_compose_static_env_file_is_not_committed():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git what it ignores")
    done = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
    assert done.returncode == 0, "docker/.env holds secrets: add it to .gitignore"


# ---------------------------------------------------------------- the checks can fail

def test_compose_static_checks_can_fail(compose):
    bad = copy.deepcopy(compose)
    svc = bad["services"]
    svc["mlflow"]["ports"] = ["5000:5000"]
    env = svc["mlflow"]["environment"]
    env["AWS_SECRET_ACCESS_KEY"] = "${AWS_SECRET_ACCESS_KEY:-hunter2hunter2}"
    env["MLFLOW_BACKEND_STORE_URI"] = "postgresql://u:hunter22@postgres:5432/mlflow"
    svc["worker"]["environment"]["MLFLOW_TRACKING_URI"] = "http://mlflow:5001"
    svc["worker"]["depends_on"]["nothere"] = {"condition": "service_healthy"}
    svc["worker"]["build"]["dockerfile"] = "docker/Nope.Dockerfile"
    svc["prefect-server"]["command"] = ["python", "-m", "prefect"]
    svc["minio-init"]["restart"] = "unless-stopped"
    assert any("binds every interface" in p for p in check_ports(bad))
    assert check_credentials(bad, "") == [
        "mlflow: AWS_SECRET_ACCESS_KEY is not a bare ${VAR} reference",
        "literal credential in URL postgresql://u:hunter22@postgres:5432/mlflow"]
    assert check_credentials(compose, "POSTGRES_PASSWORD: hunter2hunter2") == [
        "something shaped like an inline secret"]
    assert any("5001" in p for p in check_service_urls(bad))
    assert len(check_depends_on(bad)) == 3  # unknown target + two waits on the one-shot
    assert any("Nope.Dockerfile" in p for p in check_builds(bad))
    assert any("prefect image" in p for p in check_commands(bad))


def test_compose_static_package_check_can_fail():
    dockerfile = ('FROM python:3.11-slim\n'
                  'RUN apt-get update && pip install "mlflow==3.17.2" \\\n    boto3\n')
    assert pip_installs(dockerfile) == ["mlflow==3.17.2", "boto3"]
    argv = ["mlflow", "server", "--artifacts-destination=s3://b/mlflow"]
    env = {"MLFLOW_BACKEND_STORE_URI": "postgresql://${U}:${P}@postgres:5432/mlflow"}
    assert missing_packages(argv, env, dockerfile) == ["psycopg2"]
    assert missing_packages(["prefect", "worker"], {}, dockerfile) == ["prefect"]


def test_compose_static_env_example_check_can_fail():
    compose = {"a": "${NEEDED:?set it}", "b": ["${OPTIONAL:-x}", "$${ESCAPED}"]}
    problems = check_env_example(compose, "POSTGRES_PASSWORD=s3cretvalue\n")
    assert problems == ["NEEDED is required by compose.yaml but not set in .env.example",
                        "OPTIONAL (optional) is not mentioned in .env.example",
                        ".env.example: POSTGRES_PASSWORD holds 's3cretvalue', "
                        "not the placeholder change-me"]
