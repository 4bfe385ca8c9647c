"""One description of an optimizer, with the same fields for Keras and Optax.

``describe_optimizer`` reads an optimizer without touching it: Keras through ``get_config()``,
Optax through the closures its factories leave (see ``introspect.py``). Names and
hyperparameters are normalised so that equivalent optimizers of the two families describe
alike: ``keras.optimizers.AdamW(1e-3, weight_decay=0.01, global_clipnorm=1.0)`` and
``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))`` are both
``clip_by_global_norm(max_norm=1.0) -> adamw(learning_rate=0.001, b1=0.9, ...)``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import keras
import numpy as np
import optax

from kithara_ops.errors import ConfigError
from kithara_ops.optim import introspect
from kithara_ops.optim.introspect import TxNode
from kithara_ops.optim.recognise import (
    CHAINS,
    CLIPPERS,
    Part,
    flat_parts,
    injected,
    normalise,
    recognise,
    selector_texts,
    whole_optimizer,
)
from kithara_ops.optim.schedules import (
    call_text,
    callable_name,
    describe_learning_rate,
    json_safe,
    schedule_text,
    short_number,
    value_text,
)
from kithara_ops.optim.selectors import unknown_label

_KERAS_CLIPS = {  # Keras argument -> (clipping kind, Optax-style element, its argument)
    "global_clipnorm": ("global_norm", "clip_by_global_norm", "max_norm"),
    "clipnorm": ("norm", "clip_by_norm", "max_norm"), "clipvalue": ("value", "clip", "max_delta"),
}  # fmt: skip
_KERAS_NAMES = {"MultiOptimizer": "multi_optimizer", "ScheduleFreeAdamW": "schedule_free_adamw"}
_KERAS_BOOKKEEPING = {"loss_scale_factor": None, "gradient_accumulation_steps": None,
                      "use_ema": False, "is_legacy_optimizer": False}  # fmt: skip
_SHORT_KINDS = {"warmup_exponential_decay": "warmup_exp", "piecewise_constant": "piecewise",
                "piecewise_constant_decay": "piecewise", "exponential_decay": "exp_decay"}  # fmt: skip
_PEAK_KEYS = ("peak", "peak_value", "warmup_target", "init_value", "initial_learning_rate", "init", "value",
              "end_value", "end")  # fmt: skip
_LABEL_LENGTH = 40


def describe_optimizer(opt: Any) -> dict[str, Any]:
    """A JSON-serialisable description of a Keras or Optax optimizer, read without changing it.

    Args:
      opt: a ``keras.optimizers.Optimizer``, an ``optax.GradientTransformation`` (including
        ``GradientTransformationExtraArgs``) or an ``optax.MultiSteps``.

    Returns:
      A dict with, for both families:
        family: ``"keras"`` or ``"optax"``.
        name: the algorithm in lower case (``adamw``, ``sgd``, ``lion``, ...); ``"unknown"`` for
          an Optax transformation that is not built from a recognised alias.
        learning_rate: a number, a schedule text such as
          ``warmup_cosine(init=0.0, peak=0.001, warmup_steps=50, decay_steps=1000, end=0.0)``,
          or None when none was found. For ``optax.multi_transform`` and Keras'
          ``MultiOptimizer``, the first inner optimizer's (in the order of the transforms,
          or of ``optimizers``), which ``name`` names too and the ``learning_rate`` step
          metric reports.
        learning_rate_schedule: the schedule as ``{"kind": ..., <params>}``, or None.
        hyperparams: the algorithm's hyperparameters under shared names (``b1``, ``b2``,
          ``eps``, ``weight_decay``, ``momentum``, ``nesterov``, others under the names the
          alias's factory takes them by: ``sm3``'s ``momentum``, ``signum``'s ``beta``,
          ``muon``'s ``adam_b1``, ...);
          no learning rate or clipping. Values at a neutral default (``amsgrad=False``,
          ``eps_root=0.0``, ...) are left out, except SGD's ``momentum``/``nesterov``.
          ``every_k_schedule`` is added for ``MultiSteps``.
        clipping: None, or ``{"kind": "global_norm" | "norm" | "value" | "block_rms" |
          "adaptive", "value": threshold}`` for the first clipping in the chain.
        chain: the transformations in order, each ``{"name", "hyperparams"}``; an optimizer
          alias also has ``learning_rate`` (and ``injected`` for ``inject_hyperparams``).
        chain_text: the chain as one line, ``clip_by_global_norm(max_norm=1.0) -> adamw(...)``.
        injected: True when the optimizer comes from ``optax.inject_hyperparams``.
        multi_steps: True for ``optax.MultiSteps``.
        label: short text for run names and legends, such as ``optax:clip+adamw lr=1e-3``.
        tree: the raw structure (Optax: nested ``{name, hyperparams, functions, children}``;
          Keras: ``{"class_name", "config"}``).
      and for Keras only ``config``, the JSON-safe ``get_config()``.

    Raises:
      ConfigError: if ``opt`` is none of the accepted types, or an ``optax.multi_transform``
        labels parameters with a label that names none of its transforms.
    """
    if isinstance(opt, keras.optimizers.Optimizer):
        return _describe_keras(opt)
    if isinstance(opt, optax.GradientTransformation | optax.MultiSteps):
        return _describe_optax(opt)
    raise ConfigError(
        f"cannot describe an optimizer of type {type(opt).__module__}.{type(opt).__qualname__}: "
        "expected a keras.optimizers.Optimizer, an optax.GradientTransformation or MultiSteps."
    )


def optimizer_label(opt: Any) -> str:
    """The short ``label`` of ``describe_optimizer(opt)``, e.g. ``keras:adamw lr=1e-3``."""
    return describe_optimizer(opt)["label"]


def optimizer_params(description: dict[str, Any], max_len: int | None = None) -> dict[str, str]:
    """Flat string params for MLflow, with the same keys for both families.

    Args:
      description: what ``describe_optimizer`` returned.
      max_len: longest value (``None``: no limit); longer values are cut to fit and end
        in ``...``. The tracker passes MLflow's param limit.

    Returns:
      ``optimizer.family``, ``optimizer.name``, ``optimizer.learning_rate``,
      ``optimizer.<hyperparameter>`` for each normalised hyperparameter (a name that would
      clash with these keys becomes ``optimizer.hyperparams.<name>``), ``optimizer.clipping``
      (``global_norm=1.0`` or ``none``), ``optimizer.chain`` (the chain text) and
      ``optimizer.chain.<i>`` for each chain element, counted from 0.
    """
    params = {
        f"optimizer.{key}": description.get(key) for key in ("family", "name", "learning_rate")
    }
    for key, value in description.get("hyperparams", {}).items():
        reserved = key in ("family", "name", "learning_rate", "clipping", "chain")
        params[f"optimizer.hyperparams.{key}" if reserved else f"optimizer.{key}"] = value
    clipping = description.get("clipping")
    params["optimizer.clipping"] = f"{clipping['kind']}={value_text(clipping['value'])}" if clipping else "none"  # fmt: skip
    params["optimizer.chain"] = description.get("chain_text", "")
    for i, element in enumerate(description.get("chain", [])):
        params[f"optimizer.chain.{i}"] = _element_text(element)
    texts = {key: value_text(value) for key, value in params.items()}
    if max_len is None:
        return texts
    return {key: _shorten(text, max_len) for key, text in texts.items()}


def _keras_config(opt: keras.optimizers.Optimizer) -> dict[str, Any]:
    """``opt.get_config()``, or its plain public attributes for a function learning rate.

    Keras serialises a plain function as bytecode (or fails to), so it is read as it is.
    """
    lr = getattr(opt, "_learning_rate", None)  # the function itself; the property calls it
    if not callable(lr) or isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        return opt.get_config()
    plain = (bool, int, float, str, type(None))
    config = {k: v for k, v in vars(opt).items() if isinstance(v, plain) and k[0] != "_"}
    config.pop("built", None)
    return {**config, "learning_rate": lr}


def _without_names(config: Any) -> Any:
    """A Keras config without ``name`` entries at any depth: Keras numbers default names per
    session (``adam_6``), so two identical runs would describe differently."""
    if isinstance(config, dict):
        return {k: _without_names(v) for k, v in config.items() if k != "name"}
    if isinstance(config, list):
        return [_without_names(v) for v in config]
    return config


def _describe_loss_scaled(opt: Any) -> dict[str, Any]:
    """A ``LossScaleOptimizer``: its inner optimizer's description, the loss scaling first."""
    described = _describe_keras(opt.inner_optimizer)
    config = opt.get_config()
    scaling = {k: json_safe(config[k]) for k in ("initial_scale", "dynamic_growth_steps") if k in config}  # fmt: skip
    chain = [{"name": "loss_scale", "hyperparams": scaling}, *described["chain"]]
    safe_config = json_safe(_without_names(config))
    return {
        **described,
        "hyperparams": {**described["hyperparams"], "loss_scale": scaling},
        "chain": chain,
        "chain_text": " -> ".join(_element_text(element) for element in chain),
        "tree": {"class_name": type(opt).__name__, "config": safe_config},
        "config": safe_config,
    }


def _describe_multi(opt: Any) -> dict[str, Any]:
    """A ``MultiOptimizer``: each inner optimizer's chain (``optimizers``, in the order of
    ``opt.optimizers`` and of the ``learning_rate.<i>`` metrics), which parameters go to which
    (``routing``: path pattern or ``default`` -> that index, for an ``OptimizerMap``), and
    the first inner optimizer's learning rate."""
    described = [_describe_keras(o) for o in opt.optimizers]
    inner = [d["chain_text"] for d in described]
    try:
        config = _without_names(opt.get_config())
    except Exception:  # a selector function Keras cannot serialise: described by what it built
        config = {}
    mapping = config.get("optimizer_map")
    hyperparams: dict[str, Any] = {"optimizers": inner}
    if isinstance(mapping, dict) and mapping.get("class_name") == "OptimizerMap":
        routes = mapping["config"]
        serialised = {**(routes.get("optimizer_map") or {}), "default": routes.get("default_optimizer")}  # fmt: skip
        routing = {}
        for pattern, inner_config in serialised.items():
            if inner_config:  # matched by description: the config holds copies, not objects
                text = _describe_keras(keras.optimizers.deserialize(inner_config))["chain_text"]
                routing[pattern] = inner.index(text) if text in inner else text
        hyperparams["routing"] = routing
    lr = described[0]["learning_rate"] if described else None
    safe_config = json_safe(config)
    part = Part("multi_optimizer", hyperparams, lr, alias=True)
    tree = {"class_name": type(opt).__name__, "config": safe_config}
    return {**_assemble("keras", part, None, [part]), "tree": tree, "config": safe_config}


def _describe_keras(opt: keras.optimizers.Optimizer) -> dict[str, Any]:
    if isinstance(getattr(opt, "inner_optimizer", None), keras.optimizers.Optimizer):
        return _describe_loss_scaled(opt)
    if isinstance(getattr(opt, "optimizers", None), list):
        return _describe_multi(opt)
    config = _without_names(_keras_config(opt))
    name, lr = _KERAS_NAMES.get(type(opt).__name__, type(opt).__name__.lower()), config.get("learning_rate")  # fmt: skip
    if isinstance(lr, float) and float(np.float32(lr)) == lr:
        lr = float(str(np.float32(lr)))  # a float32 variable's value: 0.001, not 0.00100000005
    hyperparams = {
        key: value
        for key, value in config.items()
        if key not in ("name", "learning_rate", *_KERAS_CLIPS)
        and not (key in _KERAS_BOOKKEEPING and value == _KERAS_BOOKKEEPING[key])
        and not (key.startswith("ema_") and not config.get("use_ema"))
    }
    parts = [Part(name, normalise(name, hyperparams), lr, alias=True)]
    clipping = None
    for key, (kind, element, argument) in _KERAS_CLIPS.items():
        if config.get(key) is not None and clipping is None:  # Keras allows only one
            clipping = {"kind": kind, "value": json_safe(config[key])}
            parts.insert(0, Part(element, {argument: clipping["value"]}))
    safe_config = json_safe(config)
    tree = {"class_name": type(opt).__name__, "config": safe_config}
    return {**_assemble("keras", parts[-1], clipping, parts), "tree": tree, "config": safe_config}


def _check_labels(node: TxNode) -> None:
    """Refuse a ``multi_transform`` / ``partition`` label that names none of its transforms
    (Optax itself fails only at the first step)."""
    labels = node.functions.get("param_labels", node.hyperparams.get("param_labels"))
    if node.name == "partition" and labels is not None and len(node.roles) == len(node.children):
        unknown = unknown_label(labels, node.roles, "param_labels of optax.multi_transform")
        if unknown is not None:
            raise unknown
    for child in node.children:
        _check_labels(child)


def _describe_optax(opt: Any) -> dict[str, Any]:
    root = introspect.walk(opt)
    _check_labels(root)
    multi_steps = root.name == "MultiSteps" and bool(root.children)
    inner = root.children[0] if multi_steps else root
    parts = _elements(inner)
    main = whole_optimizer(inner)
    if main is not None:
        parts = [main]
    else:
        main = next((part for part in parts if part.alias), None)
    if main is None:  # no alias: read the algorithm from all the primitives together
        main = Part(*recognise(flat_parts(inner)))
    if main.name == "muon":  # its factory takes the Adam branch's fields as adam_*
        adam = next((p for p in parts if p.alias and p.name in ("adamw", "nadamw")), None)
        fields = {f"adam_{k}": v for k, v in (adam.hyperparams if adam else {}).items() if k in ("b1", "b2", "eps_root", "weight_decay")}  # fmt: skip
        main = dataclasses.replace(main, hyperparams={**main.hyperparams, **fields})
    clip = next((p for p in parts if p.name in CLIPPERS and not p.alias), None)
    clipping = None
    if clip is not None:
        kind, argument = CLIPPERS[clip.name]
        clipping = {"kind": kind, "value": clip.hyperparams.get(argument)}
    if multi_steps:
        every_k = root.hyperparams.get("every_k_schedule", root.functions.get("every_k_schedule"))
        every_k = schedule_text(every_k) if callable(every_k) else every_k
        main = dataclasses.replace(
            main, hyperparams={**main.hyperparams, "every_k_schedule": every_k}
        )
    return {**_assemble("optax", main, clipping, parts, multi_steps), "tree": _tree(root)}


def _elements(node: TxNode) -> list[Part]:
    """The chain as the user wrote it; a recognised alias sub-chain is one element."""
    if node.name == "inject_hyperparams":
        return [injected(node)]
    if node.name in CHAINS:
        primitives = flat_parts(node)
        name, hyperparams, lr = recognise(primitives)
        names = ["", *(p.name for p in primitives)]  # Adafactor's own clip follows its core
        own = ("scale_by_factored_rms", "clip_by_block_rms")
        user_clip = any(b in CLIPPERS and (a, b) != own for a, b in itertools.pairwise(names))
        if lr is not None and name != "unknown" and not user_clip:
            return [Part(name, hyperparams, lr, alias=True)]  # an alias: one element
        return [p for child in node.children for p in _elements(child)]
    whole = whole_optimizer(node)  # prodigy, schedule_free, ... inside a chain
    if whole is not None and whole.learning_rate is not None:  # not a helper (normalize)
        return [whole]
    hyperparams = {k: json_safe(v) for k, v in node.hyperparams.items() if v is not None}
    hyperparams.update(selector_texts(node))
    lr = None
    if node.name == "scale_by_schedule":
        lr = introspect.find_learning_rate(dataclasses.replace(node, children=[]))
    return [Part(node.name, hyperparams, lr), *(p for c in node.children for p in _elements(c))]


def _tree(node: TxNode) -> dict[str, Any]:
    return {
        "name": node.name,
        "hyperparams": json_safe(node.hyperparams),
        "functions": {k: callable_name(f) for k, f in node.functions.items()},
        "children": [_tree(child) for child in node.children],
    }


def _assemble(family: str, main: Part, clipping: Any, parts: list[Part], multi_steps: bool = False) -> dict[str, Any]:  # fmt: skip
    lr, schedule = describe_learning_rate(main.learning_rate)
    chain = [_element(part) for part in parts]
    return {
        "family": family,
        "name": main.name,
        "learning_rate": lr,
        "learning_rate_schedule": schedule,
        "hyperparams": main.hyperparams,
        "clipping": json_safe(clipping),
        "chain": chain,
        "chain_text": " -> ".join(_element_text(element) for element in chain),
        "injected": main.injected,
        "multi_steps": multi_steps,
        "label": _label(family, main, clipping, lr, schedule),
    }


def _element(part: Part) -> dict[str, Any]:
    element = {"name": part.name, "hyperparams": json_safe(part.hyperparams)}
    if part.alias or part.learning_rate is not None:
        element["learning_rate"] = describe_learning_rate(part.learning_rate)[0]
    if part.injected:
        element["injected"] = True
    return element


def _element_text(element: dict[str, Any]) -> str:
    args = {"learning_rate": element["learning_rate"]} if "learning_rate" in element else {}
    return call_text(element["name"], {**args, **element.get("hyperparams", {})})


def _label(family: str, main: Part, clipping: Any, lr: Any, schedule: Any) -> str:
    label = f"{family}:{'clip+' if clipping else ''}{main.name}"
    if schedule is not None:
        peaks = [schedule.get(k) for k in _PEAK_KEYS] + list(schedule.get("values") or [])
        peaks = [v for v in peaks if isinstance(v, int | float) and not isinstance(v, bool)]
        kind = _SHORT_KINDS.get(schedule["kind"], schedule["kind"])
        label += f" lr={kind}({short_number(max(peaks))})" if peaks else f" lr={kind}"
    elif lr is not None:
        label += f" lr={short_number(lr)}"
    every_k = main.hyperparams.get("every_k_schedule")
    if isinstance(every_k, int) and not isinstance(every_k, bool):
        label += f" k={every_k}"
    return _shorten(label, _LABEL_LENGTH)


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..." if limit > 3 else text[:limit]
