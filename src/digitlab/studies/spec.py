"""A sweep's spec: the options every trial shares ([fixed]) and the ones the study chooses ([search]),
with a structure's keys under [fixed.structure] and [search.structure], read from TOML and checked
option by option; the Optuna sampler that draws them; and the study's
storage, opened with a connection timeout and shown with its password hidden."""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digitlab.config import FIELDS, TrainConfig, read_toml, unknown_option
from digitlab.errors import UserError
from digitlab.files import one_line
from digitlab.options import problem, short_repr, value_type

GRID_SEED = 0
MAX_CHOICES = 10_000  # values in one list of choices: a longer list is a mistake (a range says it better)
MAX_GRID = 100_000  # points of a grid: GridSampler builds the whole product in memory, and no sweep runs more
CONNECT_TIMEOUT = 10  # seconds a database server gets to answer a new connection ...
TIMEOUT_VARIABLE = "DIGITLAB_CONNECT_TIMEOUT"  # ... unless this says otherwise (or the URL's connect_timeout)
TIMED_BACKENDS = ("postgresql", "mysql", "mariadb")  # their drivers take connect_timeout (libpq, psycopg, pymysql)


@dataclass(frozen=True)
class Range:
    """A number option searched between `low` and `high` (on a log scale when `log`)."""

    low: float
    high: float
    log: bool = False


STRUCTURE = "structure."  # a searched structure key's name in the study: structure.hidden


@dataclass(frozen=True)
class Spec:
    fixed: dict[str, Any]
    search: dict[str, list | Range]  # Optuna's names and choices: a list of sizes is searched as its text, "100,100"
    texts: dict[str, dict[str, Any]] = field(default_factory=dict)  # per searched key: such a text -> its value

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
        raise UserError(f"{name}: unknown table [{one_line(unknown[0])[:60]}]; a sweep spec has [fixed] and [search]")
    fixed, search = table.get("fixed", {}), dict(table.get("search", {}))
    if not isinstance(fixed, dict) or not isinstance(search, dict):
        raise UserError(f"{name}: [fixed] and [search] must be tables")
    structure = search.pop("structure", {})
    if not isinstance(structure, dict):
        raise UserError(f"{name}: [search.structure] must be a table of structure keys, e.g. hidden = [[10], [100]]")
    if not search and not structure:
        raise UserError(f"{name}: [search] is empty; name at least one option to search, e.g. "
                        "model = [\"mlp\", \"cnn\"]")
    for key, value in fixed.items():
        _known(name, "fixed", key)
        if wrong := problem(key, value, TrainConfig):
            raise UserError(f"{name}: [fixed] {key}: {wrong}")
    checked: dict[str, list | Range] = {}
    for key, value in search.items():
        _known(name, "search", key)
        if key in fixed:
            raise UserError(f"{name}: {key} is in both [fixed] and [search]; keep it in one")
        checked[key] = _choices(name, key, value)
    texts = {}
    for key, value in structure.items():
        if key in fixed.get("structure", {}):
            raise UserError(f"{name}: structure {key} is in both [fixed.structure] and [search.structure]; keep it "
                            "in one")
        checked[STRUCTURE + key], texts[STRUCTURE + key] = _structure_choices(name, key, value)
    _check_structures(name, fixed, checked, texts)
    return Spec(fixed, checked, texts)


def _structure_choices(name: str, key: str, value: Any) -> tuple[list | Range, dict[str, Any]]:
    """A searched structure key's choices as Optuna takes them: numbers and words as they are, a list (of
    sizes, or of layers) as its text ("100,100"); and each text's value."""
    from digitlab.structures import format_value

    where = f"{name}: [search.structure] {key}"
    if isinstance(value, dict):
        low, high = value.get("low"), value.get("high")
        if set(value) - {"low", "high", "log"} or not isinstance(low, (int, float)) or \
                not isinstance(high, (int, float)) or isinstance(low, bool) or isinstance(high, bool):
            raise UserError(f"{where}: a range is {{ low = ..., high = ... }} of numbers")
        if not low < high:
            raise UserError(f"{where}: low must be below high, got {low} and {high}")
        return Range(low, high, value.get("log", False) is True), {}
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: must be a non-empty list of choices, e.g. hidden = [[10, 10], [100]], or a range")
    texts = {format_value(v): v for v in value if isinstance(v, (list, dict))}
    choices = [format_value(v) if isinstance(v, (list, dict)) else v for v in value]
    if len(set(map(repr, choices))) != len(choices):
        raise UserError(f"{where}: a choice is listed twice")
    return choices, texts


def _check_structures(name: str, fixed: dict, search: dict, texts: dict) -> None:
    """Each structure key and choice, against the model where one model is swept (a typo is one line now,
    not a pruned trial each time); where the model is searched, each key must be one of some model's."""
    from digitlab.models import checked_structure, knobs

    searched = {k.removeprefix(STRUCTURE): v for k, v in search.items() if k.startswith(STRUCTURE)}
    models: list[str] = search.get("model") or [fixed.get("model", "cnn")]  # searched, it is a list (never a range)
    base = fixed.get("structure", {})
    for key in [*base, *searched]:
        if not any(key in knobs(m) for m in models):
            raise UserError(f"{name}: structure {key}: not a key of {' or '.join(models)}")
    if len(models) != 1:
        return
    try:
        checked_structure(models[0], base)
        for key, choices in searched.items():
            for choice in choices if isinstance(choices, list) else [choices.low, choices.high]:
                checked_structure(models[0], {**base, key: texts.get(STRUCTURE + key, {}).get(choice, choice)})
    except UserError as e:
        raise UserError(f"{name}: {e}") from None


def _known(name: str, table: str, key: str) -> None:
    if key not in FIELDS:
        raise UserError(f"{name}: [{table}] {unknown_option(key)}")


def _choices(name: str, key: str, value: Any) -> list | Range:
    where = f"{name}: [search] {key}"
    if isinstance(value, list):
        if not value:
            raise UserError(f"{where}: the list of choices is empty")
        if len(value) > MAX_CHOICES:
            raise UserError(f"{where}: {len(value):,} choices; a list holds at most {MAX_CHOICES:,} (search a range "
                            "{ low = ..., high = ... } instead)")
        if len(set(map(repr, value))) != len(value):
            raise UserError(f"{where}: a choice is listed twice")
        for v in value:
            if wrong := problem(key, v, TrainConfig):
                raise UserError(f"{where}: {wrong}")
        return value
    if isinstance(value, dict):
        extra = sorted(set(value) - {"low", "high", "log"})
        if extra or not {"low", "high"} <= set(value):
            raise UserError(f"{where}: a range is {{ low = ..., high = ..., log = true|false }}"
                            + (f"; unknown key '{extra[0]}'" if extra else ""))
        kind = value_type(key, TrainConfig)
        if kind not in (int, float):
            raise UserError(f"{where}: a range needs a number option; give a list of choices instead")
        low, high, log = value["low"], value["high"], value.get("log", False)
        for bound in (low, high):
            if wrong := problem(key, bound, TrainConfig):
                raise UserError(f"{where}: {wrong}")
        if not isinstance(log, bool):
            raise UserError(f"{where}: log must be true or false")
        if not low < high:
            raise UserError(f"{where}: low must be below high, got {low} and {high}")
        if log and low <= 0:
            raise UserError(f"{where}: a log range needs low above 0, got {low}")
        return Range(low, high, log)
    raise UserError(f"{where}: must be a list of choices or a range {{ low = ..., high = ... }}, got "
                    f"{short_repr(value)}")


def make_sampler(name: str | None, spec: Spec, seed: int):
    """Optuna's sampler (named as check_sampler says): grid takes the whole product, in one fixed order
    whatever the seed (the order numbers its points, and every command on the study, on any machine,
    must number them alike); random and tpe draw from lists and ranges."""
    import optuna

    name = check_sampler(name, spec)
    if name == "grid":
        return optuna.samplers.GridSampler(spec.search, seed=GRID_SEED)  # type: ignore[arg-type]  # all lists
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def check_sampler(name: str | None, spec: Spec) -> str:
    """The sampler's name (grid when every searched option is a list, else tpe), once it suits the spec: a
    grid needs lists, and its points are counted before any is made (three lists of a few hundred values
    would be 10^8 points and gigabytes)."""
    name = name or ("grid" if spec.all_lists else "tpe")
    if name == "grid":
        if not spec.all_lists:
            ranged = next(k for k, v in spec.search.items() if isinstance(v, Range))
            raise UserError(f"--sampler grid needs lists of choices; '{ranged}' is a range (use random or tpe)")
        lists = {k: v for k, v in spec.search.items() if isinstance(v, list)}  # all of them, as checked above
        points = math.prod([len(v) for v in lists.values()])
        if points > MAX_GRID:
            sizes = " x ".join(f"{len(v):,} {k}" for k, v in lists.items())
            raise UserError(f"the grid has {points:,} points ({sizes}); a grid has at most {MAX_GRID:,}: shorten "
                            "the lists, or draw from them with --sampler random or tpe")
    return name


def sampler_seed(seed: int, start: int, worker: int) -> int:
    """The seed of one command's random or tpe sampler: `--seed`, mixed with the trials the study
    held when the command started and its worker index. A command that continues a study, or a
    second worker beside the first, then draws its own points instead of repeating another's; a
    first command on a new study draws the same points every time."""
    import numpy as np

    return int(np.random.SeedSequence([seed % 2**32, start, worker]).generate_state(1)[0])


def suggest(trial, spec: Spec) -> dict[str, Any]:
    """The trial's values for the searched options, its structure's as one table over [fixed.structure]."""
    values, structure = {}, {}
    for key, choice in spec.search.items():
        if isinstance(choice, Range):
            whole = type(choice.low) is int and type(choice.high) is int if key.startswith(STRUCTURE) else (
                value_type(key, TrainConfig) is int)
            value = (trial.suggest_int(key, int(choice.low), int(choice.high), log=choice.log) if whole
                     else trial.suggest_float(key, choice.low, choice.high, log=choice.log))
        else:
            value = trial.suggest_categorical(key, choice)
        if key.startswith(STRUCTURE):
            structure[key.removeprefix(STRUCTURE)] = spec.texts.get(key, {}).get(value, value)
        else:
            values[key] = value
    if structure:
        values["structure"] = {**spec.fixed.get("structure", {}), **structure}
    return values


# ---------------------------------------------------------------------------- the study's storage

def _parsed(url: str):
    """SQLAlchemy's reading of a storage URL, or None if it cannot read it (opening it then says why)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):  # no scheme; a port that is not a number
        return None


def masked_url(url: str) -> str:
    """A storage URL as digitlab shows it, in messages and reports: its password as ***, on one line."""
    parsed = _parsed(url)
    if parsed is not None and "@" not in (parsed.host or ""):
        return one_line(parsed.render_as_string(hide_password=True))
    # unread, or an '@' in the password that was not written %40: hide all up to the last '@'
    return one_line(re.sub(r"^([^:/?#]*://[^:@/?#]*:).*@", r"\1***@", url, flags=re.DOTALL))


def masked(text: str, url: str) -> str:
    """`text` (a library's message) on one line, with the URL and its password hidden wherever they show."""
    text = text.replace(url, masked_url(url))
    password = getattr(_parsed(url), "password", None)
    if password:
        text = text.replace(f":{password}@", ":***@").replace(f"password={password}", "password=***")
    return one_line(text)


def connect_timeout() -> int:
    """Seconds a database server gets to answer: $DIGITLAB_CONNECT_TIMEOUT, else CONNECT_TIMEOUT."""
    raw = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not raw:
        return CONNECT_TIMEOUT
    if not (raw.isdigit() and 1 <= int(raw) <= 86_400):
        raise UserError(f"{TIMEOUT_VARIABLE}={one_line(raw)[:40]}: must be a whole number of seconds from 1 to "
                        f"86400 (default {CONNECT_TIMEOUT})")
    return int(raw)


def _timed(url: str) -> int | None:
    """The connection timeout of a database server's URL (its own connect_timeout, else connect_timeout());
    None for SQLite, or a URL SQLAlchemy cannot read."""
    parsed = _parsed(url)
    if parsed is None or parsed.get_backend_name() not in TIMED_BACKENDS:
        return None
    own = parsed.query.get("connect_timeout")
    return int(own) if isinstance(own, str) and own.isdigit() else connect_timeout()


def engine_kwargs(url: str) -> dict:
    """SQLAlchemy's create_engine arguments for a storage URL: a connection timeout for a database server
    (unless the URL names its own), so that a host that never answers ends in a line, not a hang."""
    timeout = _timed(url)
    if timeout is None or "connect_timeout" in _parsed(url).query:
        return {}
    return {"connect_args": {"connect_timeout": timeout}}


def reach(url: str) -> None:
    """Connect to a database server once, within its timeout: a server that refuses, does not answer, or
    does not know the user or the database is one UserError naming the URL (masked) and what to do."""
    if "@" in (getattr(_parsed(url), "host", None) or ""):  # the rest of the password, taken for the host
        raise UserError(f"cannot open the study at {masked_url(url)}: an '@' in a URL's password is written %40")
    timeout = _timed(url)
    if timeout is None:
        return
    import sqlalchemy

    start = time.monotonic()
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs(url))
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as e:  # noqa: BLE001 -- whatever the driver raises (a missing one too) is one line
        if "timeout" in str(e).lower() or time.monotonic() - start >= timeout:
            raise UserError(f"cannot open the study at {masked_url(url)}: no answer within {timeout} s (a server "
                            "down, or a firewall?); check the host and port, or wait longer with "
                            f"{TIMEOUT_VARIABLE}=SECONDS") from None
        reason = str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__]
        raise UserError(f"cannot open the study at {masked_url(url)}: {masked(reason[0], url)[:200]}") from None


def rdb_storage(url: str, **kwargs):
    """Optuna's RDBStorage on `url`, with the connection timeout (after reach() has found the server)."""
    from optuna.storages import RDBStorage

    return RDBStorage(url, engine_kwargs=engine_kwargs(url), **kwargs)
