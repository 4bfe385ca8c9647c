"""QLoRA: ``--quantize int8|int4`` quantizes a preset's frozen base before LoRA; the quantized
kernels are sharded like float ones, the run trains and resumes bit for bit, and exports."""

import json

import numpy as np
import optax
import pytest
from mlflow.tracking import MlflowClient

from kithara_ops import Trainer
from kithara_ops.checkpoint.checkpointer import Checkpointer
from kithara_ops.config import RunConfig
from kithara_ops.errors import ConfigError
from kithara_ops.export import export
from kithara_ops.models.hub import base_model_of, from_preset
from kithara_ops.plan import abstract_state, per_device
from kithara_ops.program import Program
from kithara_ops.sharding import make_mesh

keras_hub = pytest.importorskip("keras_hub")
pytestmark = pytest.mark.slow

MIN_SHARD = 512  # the scales of grouped int4 (a few thousand values) are sharded too


def batches(rows=8, length=16):
    rng = np.random.default_rng(0)
    while True:
        ids = rng.integers(0, 259, (rows, length + 1)).astype("int32")
        yield {"x": ids[:, :-1], "y": ids[:, 1:]}


@pytest.fixture(scope="module")
def wider_gemma(tiny_presets, tmp_path_factory):
    """A Gemma preset of hidden width 256: big enough that scales are a small part."""
    from kithara_ops._backend import seed_keras

    seed_keras(0)
    described = json.loads((tiny_presets["gemma"] / "config.json").read_text())["config"]
    shape = {key: described[key] for key in ("vocabulary_size", "num_query_heads",
                                             "num_key_value_heads", "layer_norm_epsilon")}  # fmt: skip
    backbone = keras_hub.models.GemmaBackbone(num_layers=2, hidden_dim=256, intermediate_dim=1024,
                                              head_dim=64, **shape)  # fmt: skip
    folder = tmp_path_factory.mktemp("wide") / "gemma"
    keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None).save_to_preset(str(folder))
    return folder


def frozen_per_device(folder, quantize, devices):
    config = RunConfig(model=str(folder), lora_rank=4, quantize=quantize, sharding="fsdp",
                       min_shard_size=MIN_SHARD, seq_len=16, batch_size=8)  # fmt: skip
    model = from_preset(str(folder), lora_rank=4, quantize=quantize, seed=0,
                        mesh=make_mesh("fsdp", None, devices), min_shard_size=MIN_SHARD)  # fmt: skip
    program = Program(model, optax.adam(1e-3), config, devices=devices)
    return per_device(abstract_state(program).non_trainable)  # the plan's frozen bytes


def test_a_quantized_base_holds_a_fraction_of_the_float_bytes_per_device(
    wider_gemma, eight_devices
):
    float32, int8, int4 = (
        frozen_per_device(wider_gemma, q, eight_devices) for q in ("none", "int8", "int4")
    )
    print(f"frozen base per device: float32 {float32}, int8 {int8}, int4 {int4} bytes")
    assert int8 <= 0.30 * float32
    assert int4 <= 0.20 * float32


@pytest.fixture(scope="module")
def qlora(tiny_presets, tmp_path_factory, eight_devices):
    root = tmp_path_factory.mktemp("qlora")
    uri = f"sqlite:///{root}/m.db"
    mesh = make_mesh("fsdp", None, eight_devices)

    def run(name, steps, resume=False, **options):
        model = from_preset(str(tiny_presets["gemma"]), lora_rank=4, quantize="int8", seed=0,
                            mesh=mesh, min_shard_size=256)  # fmt: skip
        trainer = Trainer(model, optax.adam(1e-2), batches(), steps=steps, sharding="fsdp",
                          min_shard_size=256, checkpoint_dir=str(root / name), save_every=2,
                          devices=eight_devices, **options)  # fmt: skip
        return trainer, trainer.train(resume=resume)

    straight, result = run("straight", 4, tracking_uri=uri, system_metrics=False)
    run("split", 2, tracking=False)
    split, _ = run("split", 4, resume=True, tracking=False)
    return {"root": root, "uri": uri, "straight": straight, "result": result, "split": split}


def test_qlora_trains_and_resumes_bit_for_bit(qlora):
    straight, split = qlora["straight"].state, qlora["split"].state
    assert qlora["result"].loss < 6.0 and int(split.step) == 4
    for key, value in straight.params.items():
        np.testing.assert_array_equal(np.asarray(split.params[key]), np.asarray(value))
    assert all("lora" in key for key in straight.params)
    quantized = [k for k, v in straight.non_trainable.items() if str(v.dtype) == "int8"]
    assert quantized and all(k.endswith(("kernel", "embeddings")) for k in quantized)
    store = Checkpointer(qlora["root"] / "split")
    try:
        record = store.read_record(4)
    finally:
        store.close()
    assert record.base_model["quantize"] == "int8"
    assert base_model_of(qlora["straight"].model)["quantize"] == "int8"
    params = MlflowClient(qlora["uri"]).get_run(qlora["result"].run_id).data.params
    assert params["lora.quantize"] == "int8" and "quantize" not in params  # one key for it


def test_a_qlora_run_exports_as_a_keras_hub_preset_and_refuses_hf(qlora, tmp_path):
    out = export(qlora["root"] / "straight", tmp_path / "preset")
    exported = keras_hub.models.CausalLM.from_preset(str(out))
    ids = (np.arange(16, dtype="int32")[None] * 7) % 259
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    trained = np.asarray(qlora["straight"].model(inputs))
    got = np.asarray(exported(inputs))
    # Keras merges the adapters into the int8 kernels and quantizes them again: within 5%
    # of the logits' range.
    assert np.abs(got - trained).max() <= 0.05 * np.abs(trained).max()
    for format in ("hf", "peft"):
        with pytest.raises(ConfigError, match=r"quantized \(int8\).*--format keras-hub"):
            export(qlora["root"] / "straight", tmp_path / format, format=format)


def test_quantize_needs_lora_and_a_preset(make_model):
    with pytest.raises(ConfigError, match="pass --lora-rank R too"):
        RunConfig(quantize="int8")
    from kithara_ops.models.registry import resolve_model

    with pytest.raises(ConfigError, match="not one: drop --quantize"):
        resolve_model("tiny", vocab_size=259, seq_len=16, lora_rank=None, quantize="int8")
