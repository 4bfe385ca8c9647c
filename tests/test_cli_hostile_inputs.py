"""``kithara-ops train`` against malformed and hostile input.

Every case must be a usage error: exit code 2, one ``Error:`` line on stderr naming the
problem, no traceback, and nothing left behind (no checkpoint directory, no ``mlflow.db``).
Each runs in a fresh working directory holding only the files it was given, and fails
before anything compiles; each case is a test of its own, so the workers share them out.

A case runs as a real CLI process, where stderr holds whatever the libraries print, when it
is refused before JAX and Keras load (a fraction of a second), and so does the first case of
each group refused after they load (data, optimizer specs, model factories). The other cases
of those groups run the same command in this process through Typer's ``CliRunner``: they
check the same exit code, line and files, and their group's real process already shows that
nothing the imports print reaches stderr.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kithara_ops.cli import app

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8"]
QUIET = ["--no-tracking", "--steps", "2"]


@dataclasses.dataclass
class Case:
    """One hostile input: the options, the files it needs, and a word its error must name."""

    name: str
    args: list[str]
    expect: str
    files: Callable[[Path], None] | None = None
    tracking: bool = False
    xfail: str | None = None


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def make(cwd: Path) -> None:
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return make


def _random_bytes(name: str, size: int = 4096) -> Callable[[Path], None]:
    return _write(name, os.urandom(size - 1) + b"\0")


def _yaml_bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]")
    return "\n".join(lines) + "\n"


VOCAB64_FACTORY = '''
import keras


def build(seq_len: int = 32) -> keras.Model:
    """A two-layer model predicting a vocabulary of 64, smaller than the byte data's 259."""
    ids = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(64, 8)(ids)
    return keras.Model(ids, keras.layers.Dense(64)(hidden), name="vocab64")
'''

CASES = [
    # ------------------------------------------------------------------ options
    Case("steps-zero", ["--steps", "0"], "steps"),
    Case("steps-negative", ["--steps", "-1"], "steps"),
    Case("steps-text", ["--steps", "abc"], "--steps"),
    Case("batch-size-zero", ["--batch-size", "0"], "batch_size"),
    Case("seq-len-float", ["--seq-len", "1e9"], "--seq-len"),
    Case("learning-rate-nan", ["--learning-rate", "nan"], "learning_rate"),
    Case("learning-rate-negative", ["--learning-rate", "-1"], "learning_rate"),
    Case("weight-decay-negative", ["--weight-decay", "-0.1"], "weight_decay"),
    Case("mesh-shape-one-number", ["--mesh-shape", "3"], "--mesh-shape"),
    Case("sharding-unknown", ["--sharding", "tp"], "sharding"),
    Case("precision-unknown", ["--precision", "fp8"], "precision"),
    Case("on-nonfinite-unknown", ["--on-nonfinite", "ignore"], "on_nonfinite"),
    Case("keep-zero", ["--keep", "0"], "keep"),
    Case("log-every-zero", ["--log-every", "0"], "log_every"),
    Case("grad-accum-indivisible", ["--grad-accum-steps", "3"], "grad_accum_steps"),
    Case("option-typo", ["--stesp", "3"], "--steps"),
    Case("num-processes-alone", ["--num-processes", "2"], "coordinator"),
    # ------------------------------------------------------------------ config files
    Case(
        "config-yaml-bomb", ["--config", "bomb.yaml"], "anchor", _write("bomb.yaml", _yaml_bomb())
    ),
    Case(
        "config-unknown-key",
        ["--config", "run.yaml"],
        "Did you mean 'steps'",
        _write("run.yaml", "stesp: 3\n"),
    ),
    Case("config-list", ["--config", "run.yaml"], "mapping", _write("run.yaml", "- 1\n- 2\n")),
    Case("config-2mib", ["--config", "big.yaml"], "1 MiB", _write("big.yaml", "#" * (2 << 20))),
    Case(
        "config-bad-toml", ["--config", "run.toml"], "not valid", _write("run.toml", "steps = \n")
    ),
    Case("config-binary", ["--config", "run.yaml"], "run.yaml", _random_bytes("run.yaml")),
    Case("config-missing", ["--config", "nope.yaml"], "nope.yaml"),
    # ------------------------------------------------------------------ data
    Case("data-missing", ["--data", "no/such/file.txt"], "no/such/file.txt"),
    Case("data-empty-file", ["--data", "empty.txt"], "empty.txt", _write("empty.txt", "")),
    Case("data-dir-without-text", ["--data", "corpus"], "corpus", _random_bytes("corpus/a.bin")),
    Case(
        "data-jsonl-bad-line",
        ["--data", "d.jsonl"],
        "line 2",
        _write("d.jsonl", '{"text": "fine"}\n{"text": \n'),
    ),
    Case("data-random-bytes", ["--data", "noise.bin"], "binary", _random_bytes("noise.bin")),
    Case("data-glob-matches-nothing", ["--data", "nothing/*.txt"], "matches no file"),
    Case("data-too-small", ["--data", "hi.txt"], "batch_size", _write("hi.txt", "hi")),
    # ------------------------------------------------------------------ optimizer specs
    Case("spec-none-learning-rate", ["--optimizer", "optax.adamw(None)"], "optax.adamw"),
    Case("spec-import", ["--optimizer", "__import__('os')"], "__import__"),
    Case("spec-huge-number", ["--optimizer", "optax.adamw(1e999999)"], "1e999999"),
    # ------------------------------------------------------------------ model factories
    Case("model-sys-exit", ["--model", "sys:exit"], "standard-library"),
    Case("model-os-system", ["--model", "os:system"], "standard-library"),
    Case("model-missing-module", ["--model", "nosuchmod:f"], "nosuchmod"),
    Case("model-two-colons", ["--model", "a:b:c"], "a:b:c"),
    Case(
        "model-vocab-too-small",
        ["--model", "vocab64:build"],
        "vocabulary is 64",
        _write("vocab64.py", VOCAB64_FACTORY),
    ),
    # ------------------------------------------------------------------ tracking
    Case("tracking-unknown-scheme", ["--tracking-uri", "foo://bar"], "foo", tracking=True),
    Case("tracking-not-a-uri", ["--tracking-uri", "not a uri"], "not a URI", tracking=True),
    Case("parent-run-id-not-an-id", ["--parent-run-id", "my-run"], "parent_run_id", tracking=True),
    # ------------------------------------------------------------------ checkpoints
    Case(
        "checkpoint-dir-is-a-file",
        ["--checkpoint-dir", "taken"],
        "is a file",
        _write("taken", "a file"),
    ),
    Case(
        "checkpoint-dir-under-a-file",
        ["--checkpoint-dir", "taken/run"],
        "is a file",
        _write("taken", "a file"),
    ),
    Case("resume-without-checkpoint-dir", ["--resume"], "--checkpoint-dir"),
]


IN_PROCESS = {
    # Refused after JAX and Keras load; the first case of each group is a real process.
    *("data-empty-file", "data-dir-without-text", "data-jsonl-bad-line", "data-random-bytes"),
    *("data-glob-matches-nothing", "data-too-small"),
    *("spec-import", "spec-huge-number"),
    *("model-os-system", "model-missing-module", "model-two-colons", "model-vocab-too-small"),
}
"""Cases run through ``CliRunner`` in this process (see the module's docstring)."""


@dataclasses.dataclass
class Outcome:
    """What a case's process did and what its working directory held before and after."""

    code: int
    stdout: str
    stderr: str
    before: set[str]
    after: set[str]


def _listing(cwd: Path) -> set[str]:
    return {p.relative_to(cwd).as_posix() for p in cwd.rglob("*")}


def _run_case(case: Case, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    if case.files is not None:
        case.files(cwd)
    before = _listing(cwd)
    args = ["train", *FAST, *(["--steps", "2"] if case.tracking else QUIET), *case.args]
    if case.name in IN_PROCESS:
        monkeypatch.chdir(cwd)
        monkeypatch.syspath_prepend(str(cwd))
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        done = CliRunner().invoke(app, args)
        return Outcome(done.exit_code, done.stdout, done.stderr, before, _listing(cwd))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd)])}
    env.pop("MLFLOW_TRACKING_URI", None)  # a tracking case must not reach any store
    done = subprocess.run(
        [sys.executable, "-m", "kithara_ops.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    return Outcome(done.returncode, done.stdout, done.stderr, before, _listing(cwd))


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)
    assert {case.name for case in CASES} >= IN_PROCESS
    groups = {name.split("-")[0] for name in IN_PROCESS}
    real = {case.name for case in CASES} - IN_PROCESS
    assert all(any(name.startswith(f"{group}-") for name in real) for group in groups)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.xfail)) if c.xfail else c
        for c in CASES
    ],
    ids=[c.name for c in CASES],
)
def test_hostile_input_is_one_error_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch):
    outcome = _run_case(case, tmp_path, monkeypatch)
    detail = f"exit {outcome.code}\nstdout:\n{outcome.stdout}\nstderr:\n{outcome.stderr}"
    assert "Traceback" not in outcome.stderr + outcome.stdout, detail
    assert outcome.code == 2, detail
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, detail
    assert lines[0].startswith("Error: "), detail
    assert case.expect in lines[0], detail
    assert outcome.stdout == "", detail
    assert outcome.after == outcome.before, f"left behind: {outcome.after - outcome.before}"
