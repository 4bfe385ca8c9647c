"""Recognising the algorithm of an Optax tree: its name, hyperparameters and learning rate.

``describe.py`` turns an optimizer into one description; this module holds what reads an
Optax transformation tree (``introspect.walk``) as an algorithm: the core transformation
that gives an alias its update direction, the factory an optimizer was built by (read from
its own closure where it has one, as ``prodigy`` or ``schedule_free`` do), the parts that add
hyperparameters, and the shared names and neutral values of those hyperparameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from kithara_ops.optim import introspect
from kithara_ops.optim.introspect import TxNode
from kithara_ops.optim.schedules import json_safe, schedule_text
from kithara_ops.optim.selectors import PathLabels, PathMask

_CORES = {  # the transformation that gives an Optax alias its update direction
    "scale_by_adam": "adam", "scale_by_adamax": "adamax", "scale_by_lion": "lion",
    "scale_by_factored_rms": "adafactor", "scale_by_rms": "rmsprop", "scale_by_stddev": "rmsprop",
    "scale_by_rss": "adagrad", "scale_by_belief": "adabelief", "scale_by_amsgrad": "amsgrad",
    "scale_by_yogi": "yogi", "scale_by_radam": "radam", "scale_by_adan": "adan",
    "scale_by_adadelta": "adadelta", "scale_by_sm3": "sm3", "scale_by_novograd": "novograd",
    "scale_by_lbfgs": "lbfgs", "scale_by_polyak": "polyak_sgd", "scale_by_rprop": "rprop",
    "scale_by_optimistic_gradient": "optimistic_gradient_descent", "scale_by_muon": "muon",
    "scale_by_sign": "sign_sgd", "add_noise": "noisy_sgd",
}  # fmt: skip
CLIPPERS = {  # Optax clipping transformation -> (clipping kind, its threshold argument)
    "clip_by_global_norm": ("global_norm", "max_norm"), "clip": ("value", "max_delta"),
    "clip_by_block_rms": ("block_rms", "threshold"), "adaptive_grad_clip": ("adaptive", "clipping"),
}  # fmt: skip

_EXTRAS = {  # hyperparameters an alias's other parts add: part -> {closure name: our name}
    "add_decayed_weights": {"weight_decay": "weight_decay"}, "ema": {"decay": "momentum"},
    "trace": {"decay": "momentum", "nesterov": "nesterov"},
    "clip_by_block_rms": {"threshold": "clipping_threshold"},
    "scale_by_shape": {"consistent_rms": "consistent_rms"},  # Muon's
}  # fmt: skip
CHAINS = {"chain", "named_chain"}

_SGD_PARTS = {"identity", "trace", "scale", "scale_by_schedule", "add_decayed_weights", "masked",
              "apply_if_finite", *CLIPPERS}  # fmt: skip
_RENAMES = {"beta_1": "b1", "beta_2": "b2", "epsilon": "eps"}
_NEUTRAL = {  # left out at these values (unless core to the algorithm): they change nothing
    "mu_dtype": None, "accumulator_dtype": None, "amsgrad": False, "eps_root": 0.0,
    "nesterov": False, "centered": False, "momentum": 0.0,
}  # fmt: skip
_FIRST = ("b1", "b2", "eps", "weight_decay", "momentum", "nesterov")


@dataclasses.dataclass
class Part:
    """One element of a described chain, before it is made JSON-safe."""

    name: str
    hyperparams: dict[str, Any]
    learning_rate: Any = None  # a number, an Optax schedule, a Keras schedule config, or None
    alias: bool = False
    injected: bool = False


def flat_parts(node: TxNode) -> list[TxNode]:
    """All transformations under ``node`` in order: chains flattened, wrappers kept as markers."""
    inner = [p for child in node.children for p in flat_parts(child)]
    return inner if node.name in CHAINS else [dataclasses.replace(node, children=[]), *inner]


def recognise(primitives: list[TxNode]) -> tuple[str, dict[str, Any], Any]:
    """(name, normalised hyperparameters, learning rate) of a flat list of transformations."""
    names = [p.name for p in primitives]
    lr = introspect.find_learning_rate(TxNode("chain", {}, {}, primitives))
    # scale_by_galore, scale_by_adopt, ...: the alias built around a core of its own, even
    # when it also uses a known one (GaLore projects Adam's moments).
    core = next((p for p in primitives if p.name not in _CORES and _alias_of(p.name)), None)
    core = core or next((p for p in primitives if p.name in _CORES), None)
    if {"scale_by_optimistic_gradient", "scale_by_adam"} <= set(names):  # not NAdam, nor OGD
        core = primitives[names.index("scale_by_optimistic_gradient")]
        v2 = lr is not None and lr != core.hyperparams.get("alpha")
        name = "optimistic_adam_v2" if v2 else "optimistic_adam"
        lr = lr if v2 else core.hyperparams.get("alpha")
        adam = next((p.hyperparams for p in primitives if p.name == "scale_by_adam"), {})
        # The factories' own names: v1 takes the step as alpha and ``optimism`` as beta.
        own = dict(core.hyperparams) if v2 else {"optimism": core.hyperparams.get("beta")}
        return name, normalise(name, {**adam, **own}), lr
    if core is not None and core.name == "scale_by_sign":
        name = "signum" if "ema" in names else "sign_sgd"
    elif core is not None:
        name = _alias_of(core.name) if core.name not in _CORES else _CORES[core.name]
    elif "scale_by_trust_ratio" in names:
        core = primitives[names.index("scale_by_trust_ratio")]
        name = "lars" if "trace" in names else "fromage"
    elif lr is not None and set(names) <= _SGD_PARTS:
        name = "sgd"
    else:
        merged: dict[str, Any] = {}  # whatever can be read, first value of a name wins
        for p in (p for p in primitives if p.name not in CLIPPERS):
            for key, value in p.hyperparams.items():
                merged.setdefault(key, value)
        return "unknown", normalise("unknown", merged), lr
    hyperparams = dict(core.hyperparams) if core is not None else {}
    after_core = core is None
    for p in primitives:
        after_core = after_core or p is core
        if p is not core and (after_core or p.name not in CLIPPERS):  # not a user's clip
            for source, target in _EXTRAS.get(p.name, {}).items():
                if source in p.hyperparams:
                    hyperparams.setdefault(target, p.hyperparams[source])
    decayed = "add_decayed_weights" in names
    if name == "adam":
        nadam = "nadam" if core.hyperparams.get("nesterov") else "adam"
        name = "lamb" if "scale_by_trust_ratio" in names else nadam + ("w" if decayed else "")
    elif name == "adamax" and decayed:
        name = "adamaxw"
    elif name == "rmsprop" and core.name == "scale_by_stddev":
        hyperparams["centered"] = True
    elif name == "adafactor":
        hyperparams["multiply_by_parameter_scale"] = "scale_by_param_block_rms" in names
    hyperparams = _factory_names(name, hyperparams, primitives)
    for p in primitives:  # a path mask inside an alias (adamw's weight-decay mask)
        hyperparams.update(selector_texts(p))
    internal_lr = hyperparams.pop("learning_rate", None)  # rprop keeps it inside its core
    return name, normalise(name, hyperparams), lr if lr is not None else internal_lr


def _factory_names(name: str, hyperparams: dict, primitives: list[TxNode]) -> dict:
    """Hyperparameters under the names the alias's factory takes them by, where its parts
    call them otherwise (``sm3(momentum)`` is ``scale_by_sm3(b1)``, ``signum(beta)`` an
    ``ema`` decay, ``polyak_sgd(scaling)`` an SGD step, ``muon``'s ``adam_*`` its Adam)."""
    if name == "sm3" and "b1" in hyperparams:
        hyperparams["momentum"] = hyperparams.pop("b1")
    elif name == "signum" and "momentum" in hyperparams:
        hyperparams["beta"] = hyperparams.pop("momentum")
    elif name == "polyak_sgd":
        steps = [p.hyperparams.get("step_size") for p in primitives if p.name == "scale"]
        scaling = next((-float(s) for s in steps if _is_number(s) and s < 0), None)
        if scaling is not None:
            hyperparams["scaling"] = scaling
    elif name == "muon":
        adam = next((p.hyperparams for p in primitives if p.name == "scale_by_adam"), {})
        for key in ("b1", "b2", "eps_root"):
            if key in adam:
                hyperparams[f"adam_{key}"] = adam[key]
        decays = [p.hyperparams.get("weight_decay") for p in primitives if p.name == "add_decayed_weights"]  # fmt: skip
        if len(decays) == 2:  # Muon's own, then Adam's
            hyperparams["adam_weight_decay"] = decays[1]
    return hyperparams


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def selector_texts(node: TxNode) -> dict[str, str]:
    """Masks and labels selected by path in a spec, as the text that made them."""
    return {
        key: fn.__qualname__
        for key, fn in node.functions.items()
        if isinstance(fn, PathMask | PathLabels)
    }


def _alias_of(factory: str) -> str | None:
    """``"adopt"`` for ``scale_by_adopt`` when ``optax.contrib.adopt`` or ``optax.adopt`` is
    a public optimizer: the alias built around that core."""
    if not factory.startswith("scale_by_"):
        return None
    name = factory[len("scale_by_") :]
    return name if _is_alias(name) else None


def _is_alias(name: str) -> bool:
    """Whether ``name`` is a public function of ``optax`` or ``optax.contrib``."""
    return any(callable(getattr(ns, name, None)) for ns in (optax, optax.contrib)) and not name.startswith("_")  # fmt: skip


def whole_optimizer(node: TxNode) -> Part | None:
    """An optimizer built as one transformation by its own factory (``prodigy``,
    ``dadapt_adamw``, ``momo``, ``mechanize``, ``schedule_free``), named after it."""
    own = callable(getattr(optax.contrib, node.name, None)) and not node.name.startswith("_")
    if node.name in CHAINS or not own or node.name.startswith("scale_by_"):
        return None
    hyperparams = dict(node.hyperparams)
    lr = hyperparams.pop("learning_rate", None)
    name = node.name
    if node.children:  # a wrapper: the inner optimizer's fields, under the wrapper's name
        # sam also holds an adversarial optimizer: the outer one (``optimizer``) names it.
        inner = node.child("optimizer") or node.children[0]
        inner_name, inner_hyper, inner_lr = recognise(flat_parts(inner))
        if name == "schedule_free":
            base = {"rmsprop": "adamw", "sgd": "sgd"}.get(inner_name)
            name = f"schedule_free_{base}" if base else f"schedule_free_{inner_name}"
            if base == "adamw" and "decay" in inner_hyper:  # its RMS decay is adamw's b2
                inner_hyper["b2"] = inner_hyper.pop("decay")
        else:
            name = f"{name}_{inner_name}"
        hyperparams = {**inner_hyper, **hyperparams}
        lr = lr if lr is not None else inner_lr
    return Part(name, normalise(name, hyperparams), lr, alias=True)


def injected(node: TxNode) -> Part:
    """The element for ``optax.inject_hyperparams(factory)(**hyperparams)``."""
    values: dict[str, Any] = {}
    for group in ("other_hps", "numeric_hps", "sched_hps"):
        values.update(node.hyperparams.get(group) or {})
    values = {k: getattr(v, "schedule_fn", v) for k, v in values.items()}  # unwrap schedules
    factory = node.functions.get("inner_factory")
    name = getattr(getattr(factory, "func", factory), "__name__", "unknown").lower()
    if name in ("adam", "adamw") and values.get("nesterov"):
        name = "n" + name
    lr = values.pop("learning_rate", None)
    values = {k: schedule_text(v) if callable(v) else v for k, v in values.items()}
    return Part(name, normalise(name, values), lr, alias=True, injected=True)


def normalise(name: str, hyperparams: dict[str, Any]) -> dict[str, Any]:
    """Shared names, unset and neutral values left out, the common ones first."""
    out: dict[str, Any] = {}
    for key, value in hyperparams.items():
        key = "decay" if (name, key) == ("rmsprop", "rho") else _RENAMES.get(key, key)
        if value is not None and key not in out:
            out[key] = json_safe(value)
    if name == "sgd":
        out["momentum"] = out.get("momentum") or 0.0
        out.setdefault("nesterov", False)
    elif name in ("adam", "adamw", "nadam", "nadamw"):
        out.pop("nesterov", None)  # already in the name
    core = ("momentum", "nesterov") if name == "sgd" else ()
    out = {k: v for k, v in out.items() if k in core or not _is_neutral(k, v)}
    order = {key: i for i, key in enumerate(_FIRST)}
    return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))


def _is_neutral(key: str, value: Any) -> bool:
    """True when ``value`` is ``key``'s neutral default (``0`` is not taken for ``False``)."""
    if key not in _NEUTRAL:
        return False
    return isinstance(value, bool) == isinstance(_NEUTRAL[key], bool) and value == _NEUTRAL[key]
