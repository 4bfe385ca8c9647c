"""``train``'s config options come from ``RunConfig``: one option, help text and default per field."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from kithara_ops.cli import app
from kithara_ops.cli.options import cli_fields, config_option, option_help, with_config_options
from kithara_ops.config import DEFAULT_STEPS, RunConfig, field_types
from kithara_ops.config.fields import Option, field_option, option, parse_mesh_shape
from kithara_ops.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
OPTION_FIELDS = list(FIELDS)


def params(command: str = "train") -> dict:
    """``{parameter name: click parameter}`` of one command."""
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


def invoke(*args: str):
    return runner.invoke(app, list(args))


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in result.output
    return lines[0]


# --------------------------------------------------------------------------- one option per field


def test_every_field_is_a_train_option_shown_in_its_help():
    train = params()
    assert set(cli_fields()) == set(OPTION_FIELDS)
    assert set(OPTION_FIELDS) <= set(train)
    assert not any(train[name].hidden for name in OPTION_FIELDS)
    shown = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert shown.exit_code == 0, shown.output
    for name in OPTION_FIELDS:
        assert train[name].opts[0] in shown.output, name
    own = {
        "config_file",
        "print_config",
        "dry_run",
        "resume",
        "reset_optimizer",
        "overwrite",
        "quiet",
        "json_output",
    }
    assert set(train) - set(OPTION_FIELDS) == own


def test_every_field_is_declared_with_help_and_a_panel():
    for field in FIELDS.values():
        spec = field_option(field)
        assert spec.help.strip() and spec.help.endswith("."), field.name
        assert spec.panel is not None


@pytest.mark.parametrize("name", OPTION_FIELDS)
def test_an_unset_option_is_none_so_a_config_file_keeps_its_value(name):
    assert params()[name].default is None


@pytest.mark.parametrize("name", OPTION_FIELDS)
def test_option_help_is_the_fields_help_with_the_dataclass_default(name):
    help_text = params()[name].help
    field = FIELDS[name]
    assert field_option(field).help in help_text
    assert help_text == option_help(name)
    default = field.default
    if isinstance(default, bool):
        assert "(default: --" in help_text
    elif isinstance(default, float):
        assert f"(default: {default:g})" in help_text
    elif default is not None:
        assert f"(default: {default})" in help_text
    elif name != "steps":
        assert "(default:" not in help_text  # the help says what None means


def test_steps_help_derives_its_default_from_default_steps():
    assert f"(default: {DEFAULT_STEPS} unless --epochs)" in params()["steps"].help
    assert RunConfig().steps is None and RunConfig().total_steps(None) == DEFAULT_STEPS


def test_flags_keep_their_names():
    train = params()
    assert train["keep_best"].opts == ["--keep-best"]
    assert train["keep_best"].secondary_opts == ["--keep-newest"]
    assert "--keep-newest" in train["keep_best"].help
    assert train["tracking"].secondary_opts == ["--no-tracking"]
    assert train["system_metrics"].secondary_opts == ["--no-system-metrics"]
    assert train["log_model"].opts == ["--log-model"]
    assert train["tracking_uri"].opts == ["--tracking-uri"]
    assert train["min_shard_size"].opts == ["--min-shard-size"]
    assert train["parent_run_id"].opts == ["--parent-run-id"]
    assert train["config_file"].opts == ["--config"]


def test_options_shared_with_other_commands_come_from_the_same_fields():
    for command, names in {
        "describe": ["learning_rate", "weight_decay"],
        "resume": ["coordinator", "num_processes", "process_id"],
    }.items():
        for name in names:
            assert params(command)[name].help == option_help(name), (command, name)
    assert "(default: 0.001)" in params("describe")["learning_rate"].help


def test_print_config_without_options_is_the_dataclass_default(tmp_path):
    """A real process without MLflow's variables: stdout is exactly the YAML, nothing else."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "kithara_ops.cli", "train", "--print-config"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == RunConfig().dump_yaml()


def _other_value(name: str) -> tuple[list[str], typing.Any]:
    """Command-line arguments setting field ``name`` to a value other than its default."""
    train = params()
    default = FIELDS[name].default
    special = {
        "mesh_shape": ("2x4", (2, 4)),
        "coordinator": ("127.0.0.1:1234", "127.0.0.1:1234"),
        "process_id": ("1", 1),
        "parent_run_id": ("0123456789abcdef" * 2, "0123456789abcdef" * 2),
        "profile_steps": ("3:5", "3:5"),
        "remat": ("full", "full"),
        "device_memory": ("16GiB", "16GiB"),
    }
    hint = field_types()[name]
    if name in special:
        text, value = special[name]
        return [train[name].opts[0], text], value
    if isinstance(default, bool):
        flag = train[name].secondary_opts[0] if default else train[name].opts[0]
        return [flag], not default
    if typing.get_origin(hint) is typing.Literal:
        value = next(choice for choice in typing.get_args(hint) if choice != default)
        return [train[name].opts[0], value], value
    if int in typing.get_args(hint) or hint is int:
        value = 2 * (default or 1)
        return [train[name].opts[0], str(value)], value
    if float in typing.get_args(hint) or hint is float:
        return [train[name].opts[0], "0.5"], 0.5
    return [train[name].opts[0], f"{name}-value"], f"{name}-value"


def test_every_option_sets_its_field():
    args, expected = [], {}
    for name in OPTION_FIELDS:
        more, value = _other_value(name)
        args += more
        expected[name] = value
        assert value != FIELDS[name].default, name
    result = invoke("train", *args, "--print-config")
    assert result.exit_code == 0, result.output
    assert RunConfig.from_dict(yaml.safe_load(result.stdout)) == RunConfig(**expected)


def test_min_shard_size_is_an_option():
    result = invoke("train", "--min-shard-size", "0", "--print-config")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["min_shard_size"] == 0
    refused = invoke("train", "--min-shard-size", "-1", "--print-config")
    assert refused.exit_code == 2 and "min_shard_size" in one_error_line(refused)


def test_options_override_only_what_they_set_in_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("min_shard_size: 0\nkeep_best: true\nmesh_shape: [1, 2]\n")
    result = invoke("train", "--config", str(path), "--seed", "4", "--print-config")
    printed = yaml.safe_load(result.stdout)
    assert printed["min_shard_size"] == 0 and printed["keep_best"] is True
    assert printed["mesh_shape"] == [1, 2] and printed["seed"] == 4
    again = invoke("train", "--config", str(path), "--keep-newest", "--print-config")
    assert yaml.safe_load(again.stdout)["keep_best"] is False


# --------------------------------------------------------------------------- --mesh-shape


@pytest.mark.parametrize(
    ("text", "shape"), [("2,4", [2, 4]), ("2x4", [2, 4]), (" 1 , 8 ", [1, 8]), ("4X1", [4, 1])]
)
def test_mesh_shape_forms(text, shape):
    result = invoke("train", "--mesh-shape", text, "--print-config")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["mesh_shape"] == shape


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("3", "--mesh-shape: mesh_shape '3' is not two sizes"),
        ("2,4,1", "not two sizes"),
        ("a,b", "not two sizes"),
        ("2.5,4", "not two sizes"),
        ("", "not two sizes"),
        ("0,4", "mesh_shape must be two positive integers"),
        ("2,-1", "mesh_shape must be two positive integers"),
    ],
)
def test_bad_mesh_shape_is_one_line_with_exit_2(text, fragment):
    result = invoke("train", "--mesh-shape", text, "--print-config")
    assert result.exit_code == 2, result.output
    assert fragment in one_error_line(result)


def test_parse_mesh_shape_is_public_and_checks_the_form_only():
    assert parse_mesh_shape("2,4") == (2, 4)
    assert parse_mesh_shape("8x1") == (8, 1)
    assert parse_mesh_shape("0,1") == (0, 1)  # RunConfig refuses the size
    with pytest.raises(ConfigError, match="DATA,FSDP"):
        parse_mesh_shape("2")


def test_sweep_parses_train_options_the_same_way(tmp_path):
    uri = f"sqlite:///{tmp_path}/runs.db"
    result = invoke("sweep", "--optimizer", "optax.adam(1e-3)", "--optimizer", "optax.sgd(0.1)",
                    "--mesh-shape", "3", "--tracking-uri", uri)  # fmt: skip
    assert result.exit_code == 2 and "--mesh-shape" in one_error_line(result)
    assert not (tmp_path / "runs.db").exists()


# --------------------------------------------------------------------------- config files


def bomb(levels: int = 9, width: int = 10) -> str:
    """A "billion laughs" YAML: each level is a list of ``width`` aliases of the one before,
    and a real option holds the last one (so expanding it would take ``width ** levels``)."""
    lines = ['a0: &a0 ["lol"' + ', "lol"' * (width - 1) + "]"]
    for level in range(1, levels):
        items = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{items}]")
    lines.append(f"data: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def test_yaml_bomb_is_refused_at_once_with_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb())
    assert len(path.read_bytes()) < 1000
    start = time.perf_counter()
    result = invoke("train", "--config", str(path), "--print-config")
    assert time.perf_counter() - start < 2.0
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "bomb.yaml" in line and "anchor or alias" in line


def test_large_config_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (2 << 20))  # 2 MiB: one comment, valid YAML
    result = invoke("train", "--config", str(path), "--print-config")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "big.yaml" in line and "larger than 1 MiB" in line


def test_with_config_options_refuses_a_command_that_declares_a_field():
    def command(steps: int = 1, **options: typing.Any) -> None:
        """A command."""

    with pytest.raises(TypeError, match="steps"):
        with_config_options(after="steps")(command)


def test_option_metadata_is_typed_and_checked():
    assert config_option("mesh_shape").__metadata__[0].metavar == "DATA,FSDP"
    with pytest.raises(TypeError, match="help panel"):
        Option(help="An option without a panel.")

    @dataclasses.dataclass
    class Example:
        declared: int = option(1, "A number.", "Training")
        plain: int = 2

    declared, plain = dataclasses.fields(Example)
    assert field_option(declared) == Option(help="A number.", panel="Training")
    with pytest.raises(TypeError, match="plain"):
        field_option(plain)
