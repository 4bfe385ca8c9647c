"""Tests for ``kithara_ops.config``: ``RunConfig`` validation, round trips and ``load_config``."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kithara_ops.config import RunConfig, load_config
from kithara_ops.config.files import MAX_BYTES, MAX_DEPTH
from kithara_ops.errors import ConfigError

# --------------------------------------------------------------------------- validation


def test_defaults_are_valid():
    config = RunConfig()
    assert config.batch_size == 8
    assert config.optimizer == "optax.adamw"
    assert config.mesh_shape is None
    assert RunConfig.from_dict({}) == config


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        RunConfig(batch_size=0)


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"batch_size": 0}, ["batch_size", "got 0"]),
        ({"batch_size": -4}, ["batch_size", "got -4"]),
        ({"batch_size": True}, ["batch_size", "got True"]),
        ({"batch_size": 2.0}, ["batch_size", "got 2.0"]),
        ({"batch_size": "8"}, ["batch_size", "got '8'"]),
        ({"seq_len": 0}, ["seq_len", "got 0"]),
        ({"seq_len": -1}, ["seq_len", "got -1"]),
        ({"seq_len": False}, ["seq_len", "got False"]),
        ({"log_every": 0}, ["log_every", "got 0"]),
        ({"grad_accum_steps": 0}, ["grad_accum_steps", "got 0"]),
        ({"steps": 0}, ["steps", "got 0"]),
        ({"steps": True}, ["steps", "got True"]),
        ({"epochs": 0}, ["epochs", "got 0"]),
        ({"eval_every": -1}, ["eval_every", "got -1"]),
        ({"eval_steps": 0}, ["eval_steps", "got 0"]),
        ({"sharding": "tp"}, ["sharding", "dp, fsdp", "got 'tp'"]),
        ({"precision": "fp8"}, ["precision", "float32, mixed_bfloat16", "got 'fp8'"]),
        ({"learning_rate": 0}, ["learning_rate", "got 0"]),
        ({"learning_rate": -1e-3}, ["learning_rate", "got -0.001"]),
        ({"min_shard_size": -1}, ["min_shard_size", "got -1"]),
        (
            {"batch_size": 6, "grad_accum_steps": 4},
            ["batch_size 6", "grad_accum_steps 4", "not divisible"],
        ),
        ({"mesh_shape": (0, 2)}, ["mesh_shape", "got (0, 2)"]),
        ({"mesh_shape": (1, 2, 3)}, ["mesh_shape", "got (1, 2, 3)"]),
        ({"mesh_shape": (4,)}, ["mesh_shape", "got (4,)"]),
        ({"mesh_shape": [2, -1]}, ["mesh_shape", "got [2, -1]"]),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_invalid_value_names_field_and_value(changes, fragments):
    with pytest.raises(ConfigError) as info:
        RunConfig(**changes)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("field", ["steps", "epochs", "eval_every", "eval_steps", "eval_data"])
def test_optional_fields_accept_none(field):
    assert getattr(RunConfig(**{field: None}), field) is None


def test_valid_non_defaults_are_kept():
    config = RunConfig(
        batch_size=12,
        grad_accum_steps=3,
        sharding="fsdp",
        precision="mixed_bfloat16",
        mesh_shape=(2, 4),
        min_shard_size=0,
        steps=5,
    )
    assert (config.batch_size, config.grad_accum_steps) == (12, 3)
    assert config.mesh_shape == (2, 4)


def test_mesh_shape_list_becomes_tuple():
    config = RunConfig(mesh_shape=[2, 4])
    assert config.mesh_shape == (2, 4)
    assert isinstance(config.mesh_shape, tuple)


# Validation gaps: values that are accepted, or that fail with an error other than ConfigError.


@pytest.mark.parametrize("value", ["x", None])
def test_learning_rate_of_wrong_type_is_a_config_error(value):
    with pytest.raises(ConfigError, match="learning_rate"):
        RunConfig(learning_rate=value)


def test_learning_rate_nan_is_a_config_error():
    with pytest.raises(ConfigError, match="learning_rate"):
        RunConfig(learning_rate=float("nan"))


def test_weight_decay_of_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="weight_decay"):
        RunConfig(weight_decay="x")


def test_min_shard_size_of_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="min_shard_size"):
        RunConfig(min_shard_size="x")


@pytest.mark.parametrize("value", [("a", 2), 5, (1.5, 2)], ids=["str", "int", "float"])
def test_mesh_shape_of_wrong_type_is_a_config_error(value):
    with pytest.raises(ConfigError, match="mesh_shape"):
        RunConfig(mesh_shape=value)


# --------------------------------------------------------------------------- from_dict / replace


def test_from_dict_unknown_key_suggests_the_close_one():
    with pytest.raises(
        ConfigError, match=r"Unknown config key 'batch_sise'\. Did you mean 'batch_size'\?"
    ):
        RunConfig.from_dict({"batch_sise": 4})


def test_from_dict_unknown_key_without_close_match_has_no_hint():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({"zzzzqq": 4})
    assert "'zzzzqq'" in str(info.value)
    assert "Did you mean" not in str(info.value)


def test_from_dict_validates():
    with pytest.raises(ConfigError, match="seq_len"):
        RunConfig.from_dict({"seq_len": 0})


def test_to_dict_from_dict_round_trip():
    config = RunConfig(
        model="small",
        eval_data="synthetic",
        optimizer="optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))",
        weight_decay=0.1,
        steps=7,
        mesh_shape=(2, 4),
        sharding="fsdp",
        eval_every=3,
        batch_size=16,
        grad_accum_steps=2,
    )
    values = config.to_dict()
    assert values["mesh_shape"] == [2, 4]
    assert set(values) == {f.name for f in dataclasses.fields(RunConfig)}
    json.dumps(values)  # plain values only
    assert RunConfig.from_dict(values) == config


def test_replace_applies_and_validates():
    config = RunConfig(steps=5)
    changed = config.replace(batch_size=4, seq_len=64)
    assert (changed.batch_size, changed.seq_len, changed.steps) == (4, 64, 5)
    assert config.batch_size == 8  # the original is untouched
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        config.replace(batch_size=0)
    with pytest.raises(ConfigError, match="Did you mean 'batch_size'"):
        config.replace(batch_sise=4)
    with pytest.raises(ConfigError, match="not divisible"):
        config.replace(grad_accum_steps=3)


# --------------------------------------------------------------------------- files


def test_dump_yaml_load_config_round_trip(tmp_path):
    config = RunConfig(
        optimizer="keras.AdamW(1e-3, weight_decay=0.01)",
        learning_rate=3e-4,
        mesh_shape=(1, 8),
        eval_data="data.jsonl",
        steps=100,
    )
    path = tmp_path / "run.yaml"
    path.write_text(config.dump_yaml())
    loaded = load_config(path)
    assert loaded == config
    assert loaded.mesh_shape == (1, 8)


def test_load_yml_suffix_and_string_path(tmp_path):
    path = tmp_path / "run.yml"
    path.write_text("batch_size: 4\nsharding: fsdp\n")
    config = load_config(str(path))
    assert (config.batch_size, config.sharding) == (4, "fsdp")


def test_load_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == RunConfig()


def test_load_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'model = "small"\nlearning_rate = 3e-4\nmesh_shape = [2, 4]\nsteps = 20\n'
        'optimizer = "optax.adamw(1e-3)"\n'
    )
    config = load_config(path)
    assert config == RunConfig(
        model="small",
        learning_rate=3e-4,
        mesh_shape=(2, 4),
        steps=20,
        optimizer="optax.adamw(1e-3)",
    )
    assert isinstance(config.mesh_shape, tuple)


def test_load_json(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"seq_len": 64, "mesh_shape": [4, 2], "eval_every": None}))
    config = load_config(path)
    assert config == RunConfig(seq_len=64, mesh_shape=(4, 2))
    assert isinstance(config.mesh_shape, tuple)


def test_load_validates_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 0\n")
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        load_config(path)


def test_load_unknown_key_suggests(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="Did you mean 'learning_rate'"):
        load_config(path)


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert repr(str(path)) in str(info.value)
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bad.yaml", "batch_size: [1\n"),
        ("bad.yml", "a: b: c\n"),
        ("bad.toml", "batch_size = \n"),
        ("bad.json", "{bad"),
    ],
)
def test_load_invalid_syntax_names_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert repr(str(path)) in str(info.value)
    assert "is not valid" in str(info.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("list.yaml", "- 1\n- 2\n"),
        ("scalar.yaml", "'just a string'\n"),
        ("list.json", "[1, 2]"),
    ],
)
def test_load_non_mapping_names_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert repr(str(path)) in str(info.value)
    assert "must hold a mapping" in str(info.value)


def test_load_refuses_python_yaml_tags(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="is not valid"):
        load_config(path)
    assert not marker.exists()


def test_yaml_exponent_learning_rate(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 3e-4\n")
    try:
        config = load_config(path)
    except ConfigError as err:
        assert "learning_rate" in str(err)
    else:
        assert config.learning_rate == pytest.approx(3e-4)


def test_yaml_exponent_weight_decay(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("weight_decay: 1e-2\n")
    try:
        config = load_config(path)
    except ConfigError as err:
        assert "weight_decay" in str(err)
    else:
        assert config.weight_decay == pytest.approx(1e-2)


def test_yaml_non_string_key_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("1: 2\n")
    with pytest.raises(ConfigError, match="1"):
        load_config(path)


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xff\xfe\x00batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"run\.yaml"):
        load_config(path)


def test_upper_case_toml_suffix(tmp_path):
    path = tmp_path / "run.TOML"
    path.write_text("batch_size = 4\n")
    assert load_config(path).batch_size == 4


# --------------------------------------------------------------------------- file limits


def refusal(path) -> str:
    """The one-line ``ConfigError`` message ``load_config(path)`` raises."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and repr(str(path)) in message
    return message


@pytest.mark.parametrize(
    "text",
    [
        "steps: &s 10\n",  # an anchor alone
        "base: &b {steps: 3}\nsteps: *b\n",
        "<<: *missing\n",
        "model: tiny\ndata: &d synthetic\neval_data: *d\n",
    ],
    ids=["anchor", "alias", "merge-of-undefined-alias", "reused-value"],
)
def test_yaml_anchors_and_aliases_are_refused(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    message = refusal(path)
    assert "anchor or alias" in message and "write each value out in full" in message


def test_file_over_the_size_limit_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"# " + b"x" * MAX_BYTES)
    assert "larger than 1 MiB" in refusal(path)
    at_limit = tmp_path / "ok.yaml"
    at_limit.write_bytes(b"steps: 3\n#" + b"x" * (MAX_BYTES - 10))
    assert at_limit.stat().st_size == MAX_BYTES
    assert load_config(at_limit).steps == 3


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.yaml", "steps: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n"),
        ("deep.toml", "steps = " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n"),
        ("deep.json", '{"steps": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ],
)
def test_deep_nesting_is_refused(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert "nest" in refusal(path)


def test_a_run_config_nests_well_within_the_depth_limit(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RunConfig(mesh_shape=(2, 4), steps=3).dump_yaml())
    assert load_config(path).mesh_shape == (2, 4)


def test_a_number_too_long_to_read_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: " + "9" * 5000 + "\n")
    assert "number too long" in refusal(path)


def test_a_directory_is_not_a_config_file(tmp_path):
    assert "is not a file" in refusal(tmp_path)
