"""Masks and labels that select parameters by path, in Python and in specs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kithara_ops.errors import ConfigError
from kithara_ops.optim.describe import describe_optimizer
from kithara_ops.optim.selectors import PathLabels, PathMask
from kithara_ops.optim.spec import build_optimizer

PARAMS = {
    "tiny/emb/embeddings": jnp.full((4, 2), 2.0),
    "tiny/out/kernel": jnp.full((2, 3), 3.0),
    "tiny/out/bias": jnp.full((3,), 5.0),
}
GRADS = {k: jnp.ones_like(v) for k, v in PARAMS.items()}


def one_step(tx):
    state = tx.init(PARAMS)
    updates, _ = jax.jit(tx.update)(GRADS, state, PARAMS)
    return {k: np.asarray(v) for k, v in optax.apply_updates(PARAMS, updates).items()}


def test_a_path_mask_selects_by_search():
    assert PathMask("kernel$|emb/")(PARAMS) == {
        "tiny/emb/embeddings": True,
        "tiny/out/kernel": True,
        "tiny/out/bias": False,
    }


def test_labels_take_the_first_matching_pattern():
    labels = PathLabels({"out/bias": "frozen", "out/": "sgd", ".*": "adam"})(PARAMS)
    assert labels == {
        "tiny/emb/embeddings": "adam",
        "tiny/out/kernel": "sgd",
        "tiny/out/bias": "frozen",
    }


def test_a_masked_decay_from_a_spec_decays_only_the_selected_paths():
    # One step of SGD (lr 0.1) on gradient 1, with decay 0.5 * p on the kernel only.
    tx = build_optimizer(
        'optax.chain(optax.masked(optax.add_decayed_weights(0.5), "kernel$"), optax.sgd(0.1))'
    )
    new = one_step(tx)
    np.testing.assert_allclose(new["tiny/out/kernel"], 3.0 - 0.1 * (1.0 + 0.5 * 3.0))
    np.testing.assert_allclose(new["tiny/out/bias"], 5.0 - 0.1)
    np.testing.assert_allclose(new["tiny/emb/embeddings"], 2.0 - 0.1)


def test_adamw_mask_from_a_spec_equals_the_python_mask():
    from_spec = one_step(build_optimizer('optax.adamw(0.1, weight_decay=0.5, mask="kernel")'))
    mask = {k: k.endswith("kernel") for k in PARAMS}
    from_python = one_step(optax.adamw(0.1, weight_decay=0.5, mask=mask))
    for key in PARAMS:
        np.testing.assert_array_equal(from_spec[key], from_python[key])
    assert not np.array_equal(from_spec["tiny/out/kernel"], one_step(optax.adam(0.1))["tiny/out/kernel"])  # fmt: skip


def test_multi_transform_labels_from_a_spec():
    tx = build_optimizer(
        'optax.multi_transform({"sgd": optax.sgd(0.1), "off": optax.set_to_zero()}, '
        '{"bias": "off", ".*": "sgd"})'
    )
    new = one_step(tx)
    np.testing.assert_allclose(new["tiny/out/bias"], 5.0)
    np.testing.assert_allclose(new["tiny/out/kernel"], 3.0 - 0.1)
    description = describe_optimizer(tx)
    assert "labels({'bias': 'off', '.*': 'sgd'})" in description["chain_text"]


def test_freeze_and_partition_from_specs():
    frozen = one_step(build_optimizer('optax.chain(optax.freeze("emb"), optax.sgd(0.1))'))
    np.testing.assert_allclose(frozen["tiny/emb/embeddings"], 2.0)
    np.testing.assert_allclose(frozen["tiny/out/bias"], 5.0 - 0.1)
    split = one_step(
        build_optimizer(
            'optax.partition({"a": optax.sgd(0.1), "b": optax.sgd(1.0)}, {"emb": "b", ".*": "a"})'
        )
    )
    np.testing.assert_allclose(split["tiny/emb/embeddings"], 2.0 - 1.0)
    np.testing.assert_allclose(split["tiny/out/kernel"], 3.0 - 0.1)


def test_a_path_no_label_matches_is_an_error_naming_it():
    tx = build_optimizer('optax.multi_transform({"a": optax.sgd(0.1)}, {"kernel": "a"})')
    with pytest.raises(ConfigError, match="'tiny/emb/embeddings' matches none"):
        tx.init(PARAMS)


def test_a_bad_expression_is_refused_in_one_line():
    with pytest.raises(ConfigError) as refused:
        build_optimizer('optax.adamw(1e-3, mask="(")')
    assert "mask of optax.adamw" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "spec",
    [
        "optax.polyak_sgd()",
        "optax.contrib.momo(1.0)",
        "optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau())",
    ],
)
def test_transformations_that_take_the_loss_pass_the_spec_check(spec):
    tx = build_optimizer(spec)
    state = tx.init(PARAMS)
    updates, _ = tx.update(GRADS, state, PARAMS, value=jnp.float32(2.0))
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


def test_describe_shows_a_path_mask_and_refuses_a_bad_one_in_one_line():
    from typer.testing import CliRunner

    from kithara_ops.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["describe", 'optax.adamw(1e-3, mask="kernel$")', "--json"])
    assert shown.exit_code == 0, shown.output
    params = json.loads(shown.output)["params"]
    assert params["optimizer.mask"] == "paths('kernel$')"
    refused = runner.invoke(app, ["describe", 'optax.adamw(1e-3, mask="[")'])
    assert refused.exit_code == 2
    assert refused.output.strip().count("\n") == 0 and "mask of optax.adamw" in refused.output


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("optax.lbfgs(1e-2)", "value_fn"),
        ("optax.contrib.sophia(1e-2)", "obj_fn"),
        ("optax.contrib.dpsgd(1e-2, 1.0, 0.1, 0)", "per-example gradients"),
        ("optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.1), opaque_mode=True)", "grad_fn"),
    ],
)
def test_a_spec_that_cannot_train_is_refused_naming_why(spec, why):
    with pytest.raises(ConfigError) as refused:
        build_optimizer(spec)
    message = str(refused.value)
    assert "cannot be trained here" in message and why in message and "\n" not in message
