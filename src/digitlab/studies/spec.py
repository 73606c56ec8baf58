"""A sweep's spec: the options every trial shares ([fixed]) and the ones the study chooses ([search]),
read from TOML and checked option by option; and the Optuna sampler that draws them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digitlab.config import (
    FIELDS,
    problem,
    read_toml,
    value_type,
)
from digitlab.errors import UserError
from digitlab.files import one_line

GRID_SEED = 0


@dataclass(frozen=True)
class Range:
    """A number option searched between `low` and `high` (on a log scale when `log`)."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Spec:
    fixed: dict[str, Any]
    search: dict[str, list | Range]

    @property
    def all_lists(self) -> bool:
        return all(isinstance(v, list) for v in self.search.values())


def read_spec(path: str | os.PathLike) -> Spec:
    """The spec in a TOML file, checked key by key: a wrong one is one UserError naming it."""
    path = Path(path)
    name = one_line(str(path))
    table = read_toml(path, "sweep spec")
    unknown = sorted(set(table) - {"fixed", "search"})
    if unknown:
        raise UserError(f"{name}: unknown table [{unknown[0]}]; a sweep spec has [fixed] and [search]")
    fixed, search = table.get("fixed", {}), table.get("search", {})
    if not isinstance(fixed, dict) or not isinstance(search, dict):
        raise UserError(f"{name}: [fixed] and [search] must be tables")
    if not search:
        raise UserError(f"{name}: [search] is empty; name at least one option to search, e.g. model = [\"mlp\", \"cnn\"]")
    for key, value in fixed.items():
        _known(name, "fixed", key)
        wrong = problem(key, value)
        if wrong:
            raise UserError(f"{name}: [fixed] {key}: {wrong}")
    checked: dict[str, list | Range] = {}
    for key, value in search.items():
        _known(name, "search", key)
        if key in fixed:
            raise UserError(f"{name}: {key} is in both [fixed] and [search]; keep it in one")
        checked[key] = _choices(name, key, value)
    return Spec(fixed, checked)


def _known(name: str, table: str, key: str) -> None:
    if key not in FIELDS:
        raise UserError(f"{name}: [{table}] unknown option '{key}'; the options are: {', '.join(FIELDS)}")


def _choices(name: str, key: str, value: Any) -> list | Range:
    where = f"{name}: [search] {key}"
    if isinstance(value, list):
        if not value:
            raise UserError(f"{where}: the list of choices is empty")
        if len(set(map(repr, value))) != len(value):
            raise UserError(f"{where}: a choice is listed twice")
        for v in value:
            wrong = problem(key, v)
            if wrong:
                raise UserError(f"{where}: {wrong}")
        return value
    if isinstance(value, dict):
        extra = sorted(set(value) - {"low", "high", "log"})
        if extra or not {"low", "high"} <= set(value):
            raise UserError(f"{where}: a range is {{ low = ..., high = ..., log = true|false }}"
                            + (f"; unknown key '{extra[0]}'" if extra else ""))
        kind = value_type(key)
        if kind not in (int, float):
            raise UserError(f"{where}: a range needs a number option; give a list of choices instead")
        low, high, log = value["low"], value["high"], value.get("log", False)
        for bound in (low, high):
            wrong = problem(key, bound)
            if wrong:
                raise UserError(f"{where}: {wrong}")
        if not isinstance(log, bool):
            raise UserError(f"{where}: log must be true or false")
        if not low < high:
            raise UserError(f"{where}: low must be below high, got {low} and {high}")
        if log and low <= 0:
            raise UserError(f"{where}: a log range needs low above 0, got {low}")
        return Range(low, high, log)
    raise UserError(f"{where}: must be a list of choices or a range {{ low = ..., high = ... }}, got {value!r}")


def make_sampler(name: str | None, spec: Spec, seed: int):
    """Optuna's sampler: grid (the default when every searched option is a list) takes the whole
    product, in one fixed order whatever the seed (the order numbers its points, and every command
    on the study, on any machine, must number them alike); random and tpe (the default otherwise)
    draw from lists and ranges."""
    import optuna

    name = name or ("grid" if spec.all_lists else "tpe")
    if name == "grid":
        if not spec.all_lists:
            ranged = next(k for k, v in spec.search.items() if isinstance(v, Range))
            raise UserError(f"--sampler grid needs lists of choices; '{ranged}' is a range (use random or tpe)")
        return optuna.samplers.GridSampler(spec.search, seed=GRID_SEED)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def sampler_seed(seed: int, start: int, worker: int) -> int:
    """The seed of one command's random or tpe sampler: `--seed`, mixed with the trials the study
    held when the command started and its worker index. A command that continues a study, or a
    second worker beside the first, then draws its own points instead of repeating another's; a
    first command on a new study draws the same points every time."""
    import numpy as np

    return int(np.random.SeedSequence([seed % 2**32, start, worker]).generate_state(1)[0])


def suggest(trial, spec: Spec) -> dict[str, Any]:
    """The trial's values for the searched options."""
    values = {}
    for key, choice in spec.search.items():
        if isinstance(choice, Range):
            if value_type(key) is int:
                values[key] = trial.suggest_int(key, int(choice.low), int(choice.high), log=choice.log)
            else:
                values[key] = trial.suggest_float(key, choice.low, choice.high, log=choice.log)
        else:
            values[key] = trial.suggest_categorical(key, choice)
    return values
