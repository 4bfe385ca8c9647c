"""A quick command line: ``--help`` and ``--version`` import no JAX, Keras, Optax or MLflow.

Each check runs in a fresh interpreter, since this test session has long imported them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("jax", "keras", "mlflow", "optax", "orbax", "tensorflow", "keras_hub")
"""Top-level packages that take seconds to import and that only running commands need."""

PRELUDE = f"""
import json, sys
HEAVY = set({HEAVY!r})
def heavy_imported():
    return sorted({{name.split(".")[0] for name in sys.modules}} & HEAVY)
"""
"""Put before each script: ``heavy_imported()`` lists the heavy packages imported so far."""

REPORT = """
print(json.dumps({"heavy": heavy_imported(), "result": result}))
"""
"""Put after a script that sets ``result``: prints it and the heavy packages imported."""


def run_python(script: str) -> dict:
    """Run ``script`` in a fresh interpreter; return its JSON report (see ``REPORT``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + script + REPORT],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_help_and_the_version_import_nothing_heavy():
    script = """
from typer.main import get_command
from typer.testing import CliRunner
import kithara_ops.cli

group = get_command(kithara_ops.cli.app)
runner = CliRunner()
result = {}
for args in [["--help"], ["--version"], *([name, "--help"] for name in group.commands)]:
    done = runner.invoke(kithara_ops.cli.app, args)
    result[" ".join(args)] = [done.exit_code, done.output]
"""
    report = run_python(script)
    assert report["heavy"] == []
    outputs = report["result"]
    for command in ("train", "sweep", "resume", "compare", "describe", "ui", "checkpoints"):
        assert f"{command} --help" in outputs, sorted(outputs)
    for args, (code, output) in outputs.items():
        assert code == 0, (args, output)
        assert "Usage" in output or args == "--version", (args, output)
    assert outputs["--version"][1].startswith("kithara-ops ")
    # The generated options are there: RunConfig was read without JAX or Keras.
    assert "--learning-rate" in outputs["train --help"][1]


def test_the_package_loads_its_public_names_on_first_use():
    script = """
import kithara_ops
from kithara_ops import ConfigError, RunConfig, load_config

before = heavy_imported()
config = RunConfig(steps=3)
missing = [name for name in kithara_ops.__all__ if not hasattr(kithara_ops, name)]
try:
    kithara_ops.not_a_name
    unknown = "no error"
except AttributeError as err:
    unknown = str(err)
from kithara_ops import data  # a subpackage, not a lazy name
result = {
    "before": before, "steps": config.steps, "missing": missing, "unknown": unknown,
    "all": kithara_ops.__all__, "homes": sorted(kithara_ops._HOMES), "dir": dir(kithara_ops), "data": data.__name__,
    "trainer_module": kithara_ops.Trainer.__module__,
}
"""
    report = run_python(script)
    result = report["result"]
    assert result["before"] == []  # config alone needs none of them
    assert result["steps"] == 3
    assert result["missing"] == []
    assert "not_a_name" in result["unknown"]
    assert {"Trainer", "RunConfig", "resume", "__version__"} <= set(result["all"])
    assert set(result["all"]) == {*result["homes"], "__version__"}  # every lazy name exported
    assert set(result["all"]) <= set(result["dir"])
    assert result["data"] == "kithara_ops.data"
    assert result["trainer_module"] == "kithara_ops.trainer"
    assert "keras" in report["heavy"]  # touching Trainer did import the trainer's stack


def test_the_console_command_answers_help_in_a_real_process():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "kithara_ops.cli", "--help"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "compare" in done.stdout
