"""Smoke test of ``python -m benchmarks``: every suite runs at small sizes and reports.

Only that the suites run, print their ratio tables and save JSON with sane ratios; timings
are not checked.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITES = ["tracking", "checkpointing", "resume", "memory", "startup"]
"""Suites run quick on one device; step_time and lora run on eight in tests of their own."""
TABLE_HEADER = "variant"


def ratios(tree):
    """Every ``ratio`` value in a nested JSON summary."""
    if isinstance(tree, dict):
        if "ratio" in tree:
            yield tree["ratio"]
        for value in tree.values():
            yield from ratios(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from ratios(value)


@pytest.mark.slow
@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_runs_quick_and_saves_ratios(suite, tmp_path):
    """Each suite in a process of its own (one device), as ``python -m benchmarks SUITE``."""
    output = tmp_path / "results"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    # From a scratch directory, so anything a suite wrote next to it would stay in tmp_path.
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", suite, "--quick", "--repeats", "1",
         "--output", str(output)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert_table_and_ratios(suite, done.stdout, output)


def assert_table_and_ratios(suite, stdout, output):
    """The suite printed its ratio tables and saved JSON whose ratios are finite and > 0."""
    headers = [line for line in stdout.splitlines() if line.startswith(TABLE_HEADER)]
    assert headers, stdout
    assert all(line.split()[-1] == "ratio" for line in headers)
    path = output / f"{suite}.json"
    assert f"saved {path}" in stdout
    payload = json.loads(path.read_text())
    found = list(ratios(payload["summary"]))
    assert found, f"{suite}: no ratios in {payload['summary']}"
    assert all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in found), found
    return payload


def test_step_time_skips_a_case_that_needs_more_devices_than_there_are(monkeypatch, capsys):
    from benchmarks import step_time

    monkeypatch.setattr(step_time.jax, "device_count", lambda: 1)
    assert step_time.main(repeats=1, cases=("tiny fsdp x8",), steps=3) == {}
    assert "skipped tiny fsdp x8: needs 8 devices" in capsys.readouterr().out


def step_time(tmp_path, case, devices):
    """``python -m benchmarks step_time --quick --case CASE`` on ``devices`` CPU devices:
    its summary, once it showed what every suite shows, and (not a timing) that each run
    compiled its step once. One case per process, so that each stays short when cold."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("XLA_FLAGS", None)  # --devices sets it
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "step_time", "--quick", "--repeats", "1",
         "--devices", str(devices), "--case", case, "--output", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    cases = assert_table_and_ratios("step_time", done.stdout, tmp_path)["summary"]
    assert list(cases) == [case]
    assert cases[case]["devices"] == devices
    assert cases[case]["compilations"], cases
    assert all(n == 1 for counts in cases[case]["compilations"].values() for n in counts)
    return cases


@pytest.mark.slow
def test_step_time_on_one_device_compiles_each_step_once(tmp_path):
    step_time(tmp_path, "small-step", 1)


@pytest.mark.slow
def test_step_time_shards_over_eight_devices_with_one_compilation_each(tmp_path):
    cases = step_time(tmp_path, "tiny fsdp x8", 8)
    sharded = cases["tiny fsdp x8"]
    # The hand-written loop and both Trainers ran; fit is left out of sharded cases.
    assert set(sharded["compilations"]) == {
        "reference (optax)",
        "Trainer optax.adamw",
        "Trainer keras AdamW",
    }
    assert all(n == 1 for counts in sharded["compilations"].values() for n in counts)
    # The same maths on the same data: the Optax Trainer ends at the reference's loss.
    losses = sharded["last_loss"]
    assert abs(losses["Trainer optax.adamw"][0] - losses["reference (optax)"][0]) < 1e-4


@pytest.mark.slow
def test_lora_benchmark_times_both_loops_and_bounds_fsdp_memory(tmp_path):
    pytest.importorskip("keras_hub")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("XLA_FLAGS", None)  # --devices sets it
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "lora", "--quick", "--repeats", "1",
         "--devices", "8", "--output", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "counted from array shards" in done.stdout
    cases = json.loads((tmp_path / "lora.json").read_text())["summary"]
    assert set(cases) == {"gemma lora", "gemma lora fsdp x8"}
    assert [c["devices"] for c in cases.values()] == [1, 8]
    for case in cases.values():
        found = list(ratios(case))
        assert found and all(math.isfinite(r) and r > 0 for r in found), case
        assert set(case["compilations"]) == {"reference (jit loop)", "Trainer optax.adamw"}
        assert all(n == 1 for counts in case["compilations"].values() for n in counts)
        # The same maths on the same preset, adapters and data: the same last loss.
        losses = case["last_loss"]
        assert abs(losses["Trainer optax.adamw"][0] - losses["reference (jit loop)"][0]) < 1e-4
    # Not a timing: the fullest device holds its shard of the frozen base, not all of it.
    memory = cases["gemma lora fsdp x8"]["memory"]
    frozen, adapters, opt = (
        memory["frozen_bytes"], memory["adapter_bytes"], memory["optimizer_state_bytes"]
    )  # fmt: skip
    assert adapters > 0 and opt > 0 and frozen > 10 * (adapters + opt)
    assert memory["bound_bytes"] == pytest.approx((frozen / 8 + adapters + opt) * 1.10)
    assert 0 < memory["state_bytes_per_device"] <= memory["bound_bytes"]
    assert memory["ratio"] <= 1.0
    assert "memory" not in cases["gemma lora"]
