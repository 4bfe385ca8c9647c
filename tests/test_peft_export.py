"""``export --format peft``: a LoRA run's adapters as a PEFT folder that, applied to the base's
Hugging Face weights by PEFT's formula, gives the merged ``--format hf`` export's weights."""

import json
import re

import numpy as np
import optax
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from kithara_ops import Trainer
from kithara_ops.cli.app import app
from kithara_ops.errors import ConfigError
from kithara_ops.export import export
from kithara_ops.models.hub import base_model_of, from_preset

keras_hub = pytest.importorskip("keras_hub")
pytestmark = pytest.mark.slow

RUNS = {
    # family: (from_preset's LoRA options, the Hugging Face modules the adapter must name)
    "gpt2": ({"lora_targets": "all-linear"}, ["c_attn", "c_fc", "c_proj"]),
    "gemma": ({"lora_alpha": 8.0}, ["q_proj", "v_proj"]),
}


def token_batches(rows=4, length=16):
    rng = np.random.default_rng(0)
    while True:
        ids = rng.integers(0, 259, (rows, length + 1)).astype("int32")
        yield {"x": ids[:, :-1], "y": ids[:, 1:]}


@pytest.fixture(scope="module")
def exports(tiny_presets, tmp_path_factory):
    """Per family: a 3-step LoRA run's PEFT export, its merged hf export and the base's hf."""
    out = {}
    for family, (options, _) in RUNS.items():
        root = tmp_path_factory.mktemp(family)
        model = from_preset(str(tiny_presets[family]), lora_rank=2, **options)
        Trainer(
            model, optax.adam(3e-2), token_batches(), steps=3, tracking=False,
            checkpoint_dir=str(root / "ckpt"),
        ).train()  # fmt: skip
        base = keras_hub.models.CausalLM.from_preset(str(tiny_presets[family]))
        base.export_to_transformers(str(root / "base"))
        export(root / "ckpt", root / "merged", format="hf", verify=False)
        export(root / "ckpt", root / "peft", format="peft")
        out[family] = {"root": root, "preset": tiny_presets[family], "model": model}
    return out


def peft_applied(folder, base):
    """The base's Hugging Face weights with the adapter applied as PEFT applies it:
    ``W + (alpha / r) B A`` per module (transposed for ``fan_in_fan_out``), where a module's
    ``r`` and ``alpha`` come from ``rank_pattern``/``alpha_pattern`` when a key matches."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    weights = dict(base)
    modules = {
        key.split(".lora_")[0].removeprefix("base_model.model.")
        for key in tensors
        if ".lora_" in key
    }

    def pattern(kind, module, default):
        for key, value in config[kind].items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    for key, value in tensors.items():
        if key.endswith(".bias"):  # an adapted layer's bias, trained with it ("lora_only")
            weights[key.removeprefix("base_model.model.")] = value
    for module in modules:
        a = tensors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        b = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        rank = pattern("rank_pattern", module, config["r"])
        alpha = pattern("alpha_pattern", module, config["lora_alpha"])
        assert a.shape[0] == b.shape[1] == rank
        delta = alpha / rank * (b @ a)
        weights[f"{module}.weight"] = base[f"{module}.weight"] + (
            delta.T if config["fan_in_fan_out"] else delta
        )
    return weights, modules


@pytest.mark.parametrize("family", list(RUNS))
def test_the_adapter_on_the_base_gives_the_merged_export(exports, family):
    root = exports[family]["root"]
    base = load_file(str(root / "base" / "model.safetensors"))
    merged = load_file(str(root / "merged" / "model.safetensors"))
    applied, modules = peft_applied(root / "peft", base)
    assert set(applied) == set(merged)
    changed = {name for name in merged if not np.array_equal(merged[name], base[name])}
    weights = {f"{module}.weight" for module in modules}
    biases = {f"{module}.bias" for module in modules} if family == "gpt2" else set()
    assert weights <= changed <= weights | biases  # the adapters trained, and nothing else
    for name in merged:
        np.testing.assert_allclose(applied[name], merged[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("family", list(RUNS))
def test_the_adapter_config_has_the_keys_peft_reads(exports, family):
    options, targets = RUNS[family]
    root, model = exports[family]["root"], exports[family]["model"]
    config = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 2 and config["lora_alpha"] == options.get("lora_alpha", 2.0)
    assert config["target_modules"] == targets
    assert config["fan_in_fan_out"] == (family == "gpt2")
    assert config["base_model_name_or_path"] == str(exports[family]["preset"])
    assert config["bias"] == ("lora_only" if family == "gpt2" else "none")  # Gemma: no biases
    assert config["inference_mode"] is True
    assert sorted((root / "peft").iterdir()) == [
        root / "peft" / "adapter_config.json", root / "peft" / "adapter_model.safetensors"
    ]  # fmt: skip
    tensors = load_file(str(root / "peft" / "adapter_model.safetensors"))
    layers = model.backbone.num_layers
    per_layer = {"gpt2": 4, "gemma": 2}[family]  # c_attn, c_proj, c_fc, mlp c_proj / q, v
    biases = per_layer if family == "gpt2" else 0
    assert len(tensors) == (2 * per_layer + biases) * layers
    assert all(re.fullmatch(r"base_model\.model\..+\.(lora_[AB]\.weight|bias)", k) for k in tensors)
    # Keras' query adapter shares B across heads: as a matrix its rank is heads * r (GPT-2's
    # c_attn holds the query, key and value adapters: three times that).
    heads = model.backbone.num_query_heads if family == "gemma" else 3 * model.backbone.num_heads
    query = next(k for k in tensors if re.search(r"(q_proj|c_attn)\.lora_A", k))
    module = query.removeprefix("base_model.model.").split(".lora_")[0]
    assert tensors[query].shape[0] == config["rank_pattern"][module] == heads * 2


def test_lora_alpha_and_all_linear_are_what_the_model_was_given(exports):
    gemma = base_model_of(exports["gemma"]["model"])
    assert gemma["lora_alpha"] == 8.0 and gemma["lora_targets"] == "query,value"
    adapted = [
        layer for layer in exports["gemma"]["model"].backbone._flatten_layers()
        if getattr(layer, "lora_enabled", False)
    ]  # fmt: skip
    assert adapted and all(layer.lora_alpha == 8.0 for layer in adapted)
    gpt2 = base_model_of(exports["gpt2"]["model"])
    assert set(gpt2["lora_targets"].split(",")) == {
        "query", "key", "value", "attention_output", "feedforward_intermediate_dense",
        "feedforward_output_dense",
    }  # fmt: skip


def test_runs_without_adapters_or_an_exporter_are_refused_in_one_line(tiny_presets, tmp_path):
    full = from_preset(str(tiny_presets["gpt2"]))
    Trainer(full, optax.sgd(1e-2), token_batches(), steps=1, tracking=False,
            checkpoint_dir=str(tmp_path / "full")).train()  # fmt: skip
    with pytest.raises(ConfigError, match=r"no LoRA adapters.*--format hf") as err:
        export(tmp_path / "full", tmp_path / "out", format="peft")
    assert "\n" not in str(err.value)
    llama = from_preset(str(tiny_presets["llama"]), lora_rank=2)
    Trainer(llama, optax.sgd(1e-2), token_batches(), steps=1, tracking=False,
            checkpoint_dir=str(tmp_path / "llama")).train()  # fmt: skip
    done = CliRunner().invoke(
        app, ["export", str(tmp_path / "llama"), "--format", "peft", "--out", str(tmp_path / "o")]
    )
    assert done.exit_code == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Hugging Face exporter for LlamaBackbone" in lines[0], lines
