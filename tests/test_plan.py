"""The memory plan: bytes per device from the compiled step, for the state's abstract shapes,
against what a real run places; a 2B-parameter config planned without its weights; the
pre-flight refusal and ``train --dry-run``."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import optax
import pytest
from typer.testing import CliRunner

from kithara_ops import Trainer
from kithara_ops.cli import app
from kithara_ops.config import RunConfig
from kithara_ops.config.checks import parse_bytes
from kithara_ops.errors import ConfigError
from kithara_ops.models.hub import from_preset
from kithara_ops.plan import abstract_model, memory_plan, plan_run
from kithara_ops.program import Program
from kithara_ops.sharding import make_mesh

keras_hub = pytest.importorskip("keras_hub")
pytestmark = pytest.mark.slow


def held_per_device(state):
    """The bytes of ``state``'s arrays on the device holding the most: measured on the
    placed buffers themselves."""
    held = {}
    for leaf in jax.tree.leaves(state):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


@pytest.mark.parametrize("sharding", ["dp", "fsdp"])
def test_the_plan_of_a_lora_preset_matches_what_the_run_places(
    tiny_presets, eight_devices, sharding
):
    config = RunConfig(
        model=str(tiny_presets["gemma"]), lora_rank=4, sharding=sharding, min_shard_size=256,
        seq_len=32, batch_size=8,
    )  # fmt: skip
    mesh = make_mesh(config.sharding, None, eight_devices)
    model = from_preset(config.model, lora_rank=4, seed=0, mesh=mesh, min_shard_size=256)
    program = Program(model, optax.adamw(1e-3), config, devices=eight_devices)
    plan = memory_plan(program, device_memory=2**30)
    state = program.fresh_state()
    planned = plan.trainable + plan.frozen + plan.optimizer_state
    measured = held_per_device(state)
    print(f"{sharding}: planned {planned} state bytes per device, placed {measured}")
    assert abs(planned - measured) <= 0.10 * measured
    assert plan.fits is True and plan.device_memory == 2**30 and plan.devices == 8
    assert plan.temp > 0 and plan.total >= planned + plan.temp
    # The same plan from the preset's config alone, its weights never read.
    abstract = Program(abstract_model(config, 0), optax.adamw(1e-3), config, devices=eight_devices)
    from_config = memory_plan(abstract, device_memory=2**30)
    assert (from_config.trainable, from_config.frozen, from_config.optimizer_state) == (
        plan.trainable, plan.frozen, plan.optimizer_state,
    )  # fmt: skip
    assert abs(from_config.total - plan.total) <= 0.10 * plan.total


def test_fsdp_plans_less_per_device_than_dp(tiny_presets, eight_devices):
    plans = {}
    for sharding in ("dp", "fsdp"):
        config = RunConfig(model=str(tiny_presets["gemma"]), sharding=sharding, min_shard_size=0,
                           seq_len=32, batch_size=8)  # fmt: skip
        program = Program(abstract_model(config, 0), optax.adamw(1e-3), config,
                          devices=eight_devices)  # fmt: skip
        plans[sharding] = memory_plan(program)
    assert plans["fsdp"].trainable * 4 < plans["dp"].trainable
    assert plans["fsdp"].optimizer_state * 4 < plans["dp"].optimizer_state
    assert plans["dp"].fits is None and plans["dp"].device_memory is None  # the CPU says none


PLAN_2B = textwrap.dedent(
    """
    import json, resource, sys, time
    import kithara_ops
    from kithara_ops.config import RunConfig
    from kithara_ops.plan import plan_run

    started = time.monotonic()
    config = RunConfig(model=sys.argv[1], lora_rank=8, sharding="fsdp", seq_len=256,
                       batch_size=8, device_memory="16GiB")
    plan = plan_run(config)
    print(json.dumps({"plan": plan.to_dict(), "seconds": time.monotonic() - started,
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    """
)


def test_a_2b_parameter_config_is_planned_without_its_weights(tiny_presets, tmp_path):
    described = json.loads((tiny_presets["gemma"] / "config.json").read_text())
    described["config"].update(
        vocabulary_size=256000, num_layers=18, num_query_heads=8, num_key_value_heads=1,
        hidden_dim=2048, intermediate_dim=32768, head_dim=256,
    )  # fmt: skip
    folder = tmp_path / "gemma-2b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(described))
    (folder / "metadata.json").write_text((tiny_presets["gemma"] / "metadata.json").read_text())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-c", PLAN_2B, str(folder)], capture_output=True,
                          text=True, env=env, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    plan, weights = out["plan"], 2_506_172_416 * 4  # float32 bytes of the 2.5B weights
    print(f"2B plan in {out['seconds']:.1f} s, RSS {out['rss'] / 2**30:.2f} GiB: {plan}")
    assert plan["frozen"] * 8 >= 0.99 * weights  # the base, split over 8 devices
    assert plan["fits"] is True and plan["total"] < 16 * 2**30
    assert out["rss"] < weights / 4  # far below the model's size: nothing was allocated


def test_dry_run_prints_the_plan_and_a_run_that_cannot_fit_is_refused(tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["train", "--dry-run", "--json", "--steps", "2"])
    assert done.exit_code == 0, done.output
    plan = json.loads(done.stdout)
    keys = {"trainable", "frozen", "optimizer_state", "temp", "output", "total", "fits"}
    assert keys <= set(plan) and plan["trainable"] > 0 and plan["fits"] is None
    as_text = runner.invoke(app, ["train", "--dry-run", "--device-memory", "1MiB"])
    assert as_text.exit_code == 0 and "does NOT fit" in as_text.stdout
    assert "try: --batch-size 4" in as_text.stdout
    refused = runner.invoke(app, ["train", "--device-memory", "1MiB", "--steps", "2",
                                  "--checkpoint-dir", str(tmp_path / "ckpt")])  # fmt: skip
    assert refused.exit_code == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "will not fit" in line and "1.00 MiB" in line and "--dry-run" in line
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
    remat = runner.invoke(app, ["train", "--remat", "full", "--steps", "2", "--json",
                                "--no-tracking"])  # fmt: skip
    assert remat.exit_code == 0, remat.output
    assert json.loads(remat.stdout.strip().splitlines()[-1])["step"] == 2


def test_sizes_parse_and_a_bad_one_is_a_config_error():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("16 GB") == 16 * 10**9
    assert parse_bytes("1e9") == 10**9
    for bad in ("lots", "-1GB", "0", "5 parsecs"):
        with pytest.raises(ConfigError, match="is not a size"):
            parse_bytes(bad)
    with pytest.raises(ConfigError, match="device_memory 'x'"):
        RunConfig(device_memory="x")


def test_plan_run_needs_only_the_config_of_a_built_in_model():
    plan = plan_run(RunConfig(model="tiny", device_memory="1GiB"))
    assert plan.fits is True and plan.frozen < 1024 and plan.trainable > 4 * 10**6


def test_full_remat_lowers_the_temporaries_and_keeps_the_loss(make_model, stdlib_data):
    from kithara_ops.models.remat import remat_scope, rematerialize

    temp = {
        mode: plan_run(RunConfig(model="tiny", remat=mode, seq_len=128, batch_size=8)).temp
        for mode in ("none", "full")
    }
    print(f"temporaries per device: {temp}")
    assert temp["full"] < temp["none"]  # 4 layers: their activations are recomputed
    losses = {}
    for mode in ("none", "full"):
        with remat_scope(mode):
            model = rematerialize(make_model(seed=0))
        trainer = Trainer(model, optax.sgd(0.1), stdlib_data, steps=5, log_every=1,
                          tracking=False)  # fmt: skip
        losses[mode] = trainer.train().loss
    assert abs(losses["full"] - losses["none"]) <= 1e-6, losses
    with pytest.raises(ConfigError, match="remat 'partial' is not a mode"):
        RunConfig(remat="partial")
    assert RunConfig(remat="larger_than:4096").remat == "larger_than:4096"


def test_pure_bfloat16_halves_the_state_and_logs_the_optimizer_state_dtype(tmp_path):
    from mlflow.tracking import MlflowClient

    from kithara_ops.build import build_trainer

    plans = {p: plan_run(RunConfig(model="tiny", precision=p)) for p in ("float32", "bfloat16")}
    assert plans["bfloat16"].trainable * 2 == plans["float32"].trainable
    assert plans["bfloat16"].optimizer_state * 2 <= plans["float32"].optimizer_state + 64
    uri = f"sqlite:///{tmp_path}/m.db"
    trainer = build_trainer(RunConfig(precision="bfloat16", steps=20, seq_len=64, log_every=1,
                                      tracking_uri=uri, system_metrics=False))  # fmt: skip
    result = trainer.train()
    dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(trainer.state.opt_state)}
    assert {str(v.dtype) for v in trainer.state.params.values()} == {"bfloat16"}
    assert dtypes - {"int32"} == {"bfloat16"}  # Adam's moments follow the parameters
    params = MlflowClient(uri).get_run(result.run_id).data.params
    assert params["precision"] == "bfloat16" and params["optimizer_state_dtype"] == "bfloat16"
    history = MlflowClient(uri).get_metric_history(result.run_id, "loss")
    assert history[-1].value < history[0].value - 1.0  # it trains
