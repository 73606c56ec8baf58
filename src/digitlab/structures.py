"""A network's structure as data: the knobs of a registered model, and networks written as layer lists.

The chapter says a hidden layer's size "can be adjusted" and picks sigmoid for its non-linearity;
here those choices are values, so a learner changes them without writing Python:

    digitlab train mlp --structure hidden=100,100 --structure activation=relu
    [structure]                      # in a config file, a sweep's [fixed.structure], a run's config.toml
    hidden = [100, 100]

A registered model's knobs are its factory's keyword arguments (models.py), with their defaults:
the chapter's structures when nothing is given. The `layers` model is a list of layers in a TOML
file; `plan_layers` works out every layer's input and output shape for a 1x28x28 picture, so a list
that does not fit is one line naming the layer, before anything is built.

This module needs no torch: it checks values and shapes, and models.py builds the modules.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from digitlab.errors import UserError
from digitlab.files import one_line

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "gelu")  # the functions are models.ACTIVATION
POOLS = ("max", "avg")
NORMS = ("batch", "none")
MAX_SIZE = 1_000_000  # units or channels of one layer; the weights' estimate bounds the whole network
MAX_LAYERS = 200  # layers in a layer list
MAX_WEIGHT_BYTES = 1_000_000_000  # 1 GB of float32 weights: 250 million parameters
BYTES_PER_WEIGHT = 4
INPUT_SHAPE = (1, 28, 28)  # (channels, height, width) of one picture


@dataclass(frozen=True)
class Knob:
    """What one structure key means, for --help, the docs and the checks."""

    help: str
    kind: str  # sizes, size, fraction, a choice ("choice"), or layers
    choices: tuple[str, ...] = ()
    empty: bool = False  # sizes: an empty list is a structure too (no hidden layer)


KNOBS = {
    "hidden": Knob("the hidden layers' sizes, input side first (any number of layers; empty: none)", "sizes",
                   empty=True),
    "channels": Knob("the channels of each convolution block, one number a block", "sizes"),
    "widths": Knob("the channels of each conv/norm/pool block, one number a block", "sizes"),
    "kernel": Knob("the convolutions' kernel size (padded to keep the picture's size)", "size"),
    "activation": Knob("the non-linearity after each layer but the output", "choice", ACTIVATIONS),
    "pool": Knob("max or avg(erage) pooling after each convolution", "choice", POOLS),
    "norm": Knob("batch: BatchNorm after each convolution; none: a bias instead", "choice", NORMS),
    "dropout": Knob("the fraction of features dropped before the output layer while training", "fraction"),
    "layers": Knob("the network as a list of layers (a TOML file: see docs/structures.md)", "layers"),
}


# ---------------------------------------------------------------------------- the command line

def parse_assignment(text: str) -> tuple[str, Any]:
    """`hidden=100,100` -> ('hidden', [100, 100]); `activation=relu` -> ('activation', 'relu');
    `hidden=` -> ('hidden', []). A value is a whole number, a number, true/false or a word."""
    key, equals, value = text.partition("=")
    key = key.strip()
    if not equals or not key:
        raise UserError(f"--structure {one_line(text)[:60]!r}: write KEY=VALUE, e.g. hidden=100,100 or "
                        "activation=relu")
    value = value.strip()
    if "," in value or not value:
        items = [item.strip() for item in value.split(",")] if value else []
        if any(not item for item in items):
            raise UserError(f"--structure {one_line(text)[:60]}: an empty item in the list; write "
                            f"{key}=100,100")
        return key, [_scalar(item) for item in items]
    return key, _scalar(value)


def _scalar(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_model(text: str) -> tuple[str, dict]:
    """A model with its variant, as `compare` and `summary` take it: `mlp:hidden=100:activation=relu` ->
    ('mlp', {'hidden': [100], 'activation': 'relu'})."""
    name, *assignments = text.split(":")
    return name.strip(), dict(parse_assignment(a) for a in assignments)


# ---------------------------------------------------------------------------- checking a model's knobs

def nearest(word: str, words) -> str:
    """'; did you mean X?' for the closest of `words`, or nothing."""
    close = difflib.get_close_matches(str(word), list(words), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_structure(model: str, given: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """The model's whole structure: its `defaults` (None: a knob without one) with the `given` values,
    each checked. Raises one UserError naming the key and what is wrong."""
    if not isinstance(given, dict):
        raise UserError(f"structure: must be a table of KEY = VALUE, got {_shown(given)}")
    for key in given:
        if key not in defaults:
            keys = ", ".join(defaults) or "none: its structure is fixed"
            raise UserError(f"{model} has no structure key '{one_line(str(key))[:40]}'{nearest(key, defaults)} "
                            f"(its keys: {keys})")
    full = {**defaults, **given}
    for key, value in full.items():
        if value is None:
            raise UserError(f"{model} needs structure key '{key}': {KNOBS[key].help if key in KNOBS else 'no default'}")
        full[key] = check_knob(key, value, defaults[key], model)
    return full


def check_knob(key: str, value: Any, default: Any, model: str = "") -> Any:
    """A knob's value, normalised (a single size where sizes are wanted is a list of one), or UserError."""
    where = f"{model} structure {key}".strip()
    knob, like = KNOBS.get(key), _knob_like(default)
    if knob is None or (default is not None and like.kind not in (knob.kind, "other")):
        knob = like  # a Python-registered model's key, or one of ours with another type there ("hidden": 64)
    if knob.kind == "sizes":
        items = value if isinstance(value, list) else [value]
        if not items and not knob.empty:
            raise UserError(f"{where}: needs at least one size, e.g. {key}=16,32")
        if len(items) > MAX_LAYERS:
            raise UserError(f"{where}: {len(items):,} sizes; a network has at most {MAX_LAYERS} layers")
        return [_size(where, item) for item in items]
    if knob.kind == "size":
        return _size(where, value)
    if knob.kind == "fraction":
        if type(value) not in (int, float) or not (0 <= value < 1):
            raise UserError(f"{where}: must be a number from 0 to below 1, got {_shown(value)}")
        return float(value)
    if knob.kind == "choice":
        if value not in knob.choices:
            raise UserError(f"{where}: unknown {key} {_shown(value)}{nearest(value, knob.choices)} (choose from "
                            f"{', '.join(knob.choices)})")
        return value
    if knob.kind == "layers":
        plan_layers(value)  # every layer fits its input, and the weights fit in memory
        return _layer_tables(value)
    if type(default) is float and type(value) is int:
        return float(value)
    if type(value) is not type(default):  # a knob of a model registered from Python: its default's type
        raise UserError(f"{where}: must be like its default {_shown(default)}, got {_shown(value)}")
    return value


def _knob_like(default: Any) -> Knob:
    """A knob that KNOBS does not describe (a Python-registered model's), checked by its default's type."""
    if isinstance(default, (list, tuple)) and all(type(v) is int for v in default):
        return Knob("", "sizes", empty=True)
    if type(default) is int:
        return Knob("", "size")
    return Knob("", "other")


def _size(where: str, value: Any) -> int:
    if type(value) is not int:
        raise UserError(f"{where}: a size must be a whole number, got {_shown(value)}")
    if not 1 <= value <= MAX_SIZE:
        raise UserError(f"{where}: a size must be from 1 to {MAX_SIZE:,}, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    text = one_line(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------- names for people

def structure_label(model: str, structure: dict, defaults: dict) -> str:
    """A run's structure in a few words: 'mlp' for the defaults, 'mlp hidden=100,100 activation=relu'
    for a variant, 'layers conv16/3 relu maxpool2 ...' for a layer list."""
    changed = [(k, v) for k, v in structure.items() if defaults.get(k) != v and not _same(defaults.get(k), v)]
    return " ".join([model] + [format_value(v) if k == "layers" else f"{k}={format_value(v)}" for k, v in changed])


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)


def format_value(value: Any) -> str:
    """A knob's value as the command line writes it: [100, 100] -> '100,100'; a layer list in short."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], dict):
        return " ".join(_layer_words(layer) for layer in value)
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def folder_name(label: str) -> str:
    """A label as a folder's name: 'mlp hidden=100,100' -> 'mlp_hidden=100,100' (no slash or space); a layer
    list's, whose label is its layers, is 'layers'."""
    return "layers" if label.startswith("layers ") else re.sub(r"[^\w=,.+-]", "_", label)[:100]


# ---------------------------------------------------------------------------- layer lists

# Each layer kind with its keys and their defaults (None: required). Activations take no key.
LAYER_KEYS: dict[str, dict[str, Any]] = {
    "conv": {"channels": None, "kernel": 3, "stride": 1, "padding": None},  # padding: kernel // 2
    "maxpool": {"size": 2},
    "avgpool": {"size": 2},
    "batchnorm": {},
    "dropout": {"p": 0.5},
    "flatten": {},
    "linear": {"size": None},
    **{name: {} for name in ACTIVATIONS},
}


@dataclass(frozen=True)
class PlannedLayer:
    """One layer of a list, with what it takes and gives for one 1x28x28 picture."""

    index: int  # 1-based, as a person counts the list
    kind: str
    args: dict  # the layer's keys, defaults filled in
    input_shape: tuple[int, ...]  # (C, H, W), or (features,) once flat
    output_shape: tuple[int, ...]
    params: int

    @property
    def name(self) -> str:
        return f"layer {self.index} ({_layer_words({'type': self.kind, **self.args})})"


def _layer_tables(layers: Any) -> list[dict]:
    """The list as tables: a bare name ("relu") is {type = "relu"}."""
    if not isinstance(layers, list) or not layers:
        raise UserError("structure layers: must be a list of layers, e.g. [{ type = \"conv\", channels = 16 }, "
                        "\"relu\", \"maxpool\", { type = \"linear\", size = 64 }] (docs/structures.md)")
    if len(layers) > MAX_LAYERS:
        raise UserError(f"structure layers: {len(layers):,} layers; a list holds at most {MAX_LAYERS}")
    tables = []
    for i, layer in enumerate(layers, 1):
        table = {"type": layer} if isinstance(layer, str) else layer
        if not isinstance(table, dict) or not isinstance(table.get("type"), str):
            raise UserError(f"structure layers: layer {i} is {_shown(layer)}; a layer is a name (\"relu\") or a "
                            "table with a type ({ type = \"linear\", size = 64 })")
        kind = table["type"]
        if kind not in LAYER_KEYS:
            raise UserError(f"structure layers: layer {i} has unknown type {_shown(kind)}{nearest(kind, LAYER_KEYS)} "
                            f"(the types: {', '.join(LAYER_KEYS)})")
        keys = LAYER_KEYS[kind]
        for key in table:
            if key != "type" and key not in keys:
                raise UserError(f"structure layers: layer {i} ({kind}) has no key '{one_line(str(key))[:40]}'"
                                f"{nearest(key, keys)} (its keys: {', '.join(keys) or 'none'})")
        args = {k: table.get(k, default) for k, default in keys.items()}
        tables.append({"type": kind, **{k: v for k, v in args.items() if v is not None}})
        for key, value in args.items():
            if value is None and key != "padding":
                raise UserError(f"structure layers: layer {i} ({kind}) needs its {key}, e.g. "
                                f"{{ type = \"{kind}\", {key} = 16 }}")
    return tables


def plan_layers(layers: Any) -> list[PlannedLayer]:
    """Every layer's input and output shape for one 1x28x28 picture, and its parameter count. A layer
    that cannot take its input is one UserError naming it and why, as is a network whose weights would
    not fit in memory."""
    shape: tuple[int, ...] = INPUT_SHAPE
    planned = []
    for i, table in enumerate(_layer_tables(layers), 1):
        kind, args = table["type"], {k: v for k, v in table.items() if k != "type"}
        where = f"structure layers: layer {i} ({_layer_words(table)})"
        output, params = _layer_shape(where, kind, args, shape)
        if kind == "conv" and "padding" not in args:
            args["padding"] = args["kernel"] // 2
        planned.append(PlannedLayer(i, kind, args, shape, output, params))
        shape = output
    check_weights("layers", sum(p.params for p in planned), max(planned, key=lambda p: p.params))
    return planned


def _layer_shape(where: str, kind: str, args: dict, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(output shape, parameters) of one layer given its input shape."""
    for key, value in args.items():
        low = 0 if key == "padding" else 1
        if key == "p":
            if type(value) not in (int, float) or not 0 <= value < 1:
                raise UserError(f"{where}: p must be a number from 0 to below 1, got {_shown(value)}")
        elif type(value) is not int or not low <= value <= MAX_SIZE:
            raise UserError(f"{where}: {key} must be a whole number from {low} to {MAX_SIZE:,}, got {_shown(value)}")
    if kind in ("conv", "maxpool", "avgpool") and len(shape) != 3:
        raise UserError(f"{where}: needs a picture (channels x height x width), but its input is already flat "
                        f"({shape[0]:,} features): put it before flatten and linear")
    if kind == "conv":
        c, h, w = shape
        k, s = args["kernel"], args["stride"]
        p = args.get("padding", k // 2)
        if k > h or k > w:
            raise UserError(f"{where}: the kernel ({k}x{k}) is larger than its {h}x{w} input: the network is too "
                            "deep for 28x28, or the kernel too large")
        out = (args["channels"], (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
        return out, c * args["channels"] * k * k + args["channels"]
    if kind in ("maxpool", "avgpool"):
        c, h, w = shape
        size = args["size"]
        if size > h or size > w:
            raise UserError(f"{where}: its {h}x{w} input is smaller than the {size}x{size} window: the network is "
                            "too deep for 28x28 (fewer pooling layers, or smaller windows)")
        return (c, h // size, w // size), 0
    if kind == "batchnorm":
        return shape, 2 * shape[0]
    if kind == "flatten":
        return (math.prod(shape),), 0
    if kind == "linear":
        if len(shape) == 3:
            raise UserError(f"{where}: its input is a picture ({'x'.join(map(str, shape))}); put \"flatten\" before it")
        return (args["size"],), shape[0] * args["size"] + args["size"]
    return shape, 0  # an activation or dropout


def check_weights(model: str, params: int, biggest=None) -> None:
    """Refuse a network whose float32 weights alone would take more than MAX_WEIGHT_BYTES."""
    size = params * BYTES_PER_WEIGHT
    if size > MAX_WEIGHT_BYTES:
        where = f", {biggest.name} alone {biggest.params:,}" if biggest is not None else ""
        raise UserError(f"{model}: its weights would take {size / 1e9:,.1f} GB ({params:,} parameters{where}); "
                        f"digitlab builds networks up to {MAX_WEIGHT_BYTES / 1e9:.1f} GB: choose smaller sizes")


def _layer_words(layer: dict) -> str:
    """A layer in a few characters: conv16/3, maxpool2, linear64, dropout0.5, relu."""
    kind = layer["type"]
    if kind == "conv":  # channels/kernel, and a stride or padding other than the usual
        kernel = layer.get("kernel", 3)
        extra = f" stride{layer['stride']}" if layer.get("stride", 1) != 1 else ""
        extra += f" pad{layer['padding']}" if layer.get("padding", kernel // 2) != kernel // 2 else ""
        return f"conv{layer.get('channels', '?')}/{kernel}{extra}"
    main = {"maxpool": "size", "avgpool": "size", "linear": "size", "dropout": "p"}.get(kind)
    return f"{kind}{layer.get(main, '')}" if main else kind
