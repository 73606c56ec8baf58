"""`digitlab sweep SPEC.toml`: many runs at once, on Optuna, with their cost measured.

The spec is a TOML file with two tables, under the training options' config-file names:

    [fixed]                 # options every trial shares
    task = "classify"
    epochs = 1
    [search]                # options the study chooses
    model = ["mlp", "cnn", "lenet5", "convnet_small"]       # a list: one of these
    lr = { low = 0.0005, high = 0.05, log = true }           # a range of a number option

Each trial is an ordinary run folder under OUT/trials/ (so `evaluate`, `predict`, `serve`
and `plot` work on it); its validation accuracy is the objective, and its test accuracy,
training seconds, training FLOPs (one step counted by torch's FlopCounterMode, times the
steps taken) and parameter count are the trial's attributes. The study lives in Optuna's
storage (SQLite in OUT by default, or any database URL), so several commands, on one
machine or many, can work on one study.

A trial that stops short is retried: a Ctrl-C or SIGTERM fails the running trial and queues a
copy of it, which the next command on the study runs first; a process that is killed outright
(or a machine that is lost) stops beating its heart, and after `grace` seconds the next trial
any command starts fails the stale one and queues its copy (Optuna's heartbeat).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digitlab.config import (
    FIELDS,
    VAL_SPLIT,
    TrainConfig,
    problem,
    read_toml,
    value_type,
)
from digitlab.errors import UserError
from digitlab.files import one_line, write_text
from digitlab.models import create_model
from digitlab.plots import pareto_front, plot_pareto, save_figure
from digitlab.stop import SIGNALS, Interrupted, StopRequest
from digitlab.tasks import get_task
from digitlab.training.reporters import Reporter
from digitlab.training.run import run

SAMPLERS = ("grid", "random", "tpe")
STUDY = "digitlab"
RESULT_COLUMNS = ("val_accuracy", "test_accuracy", "train_seconds", "train_flops", "params", "run", "retry_of")
GRACE = 60  # seconds without a heartbeat after which a running trial is taken for dead
MAX_RETRY = 3  # copies of one stopped trial, at most
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


def training_flops(config: TrainConfig) -> int:
    """FLOPs of one training step (forward and backward) at the config's batch size, counted by
    torch.utils.flop_counter on a fresh model; the data do not change the count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    task = get_task(config.task)
    model = create_model(config.model, num_outputs=task.outputs, init=config.init)
    batch = config.batch_size + (max(1, config.batch_size // 4) if config.reject else 0)
    images = torch.zeros(batch, 1, 28, 28)
    labels = torch.zeros(config.batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        output = model(images)
        task.loss(output[:config.batch_size], labels).backward()
    return int(counter.get_total_flops())


def run_sweep(spec: Spec, data, out: str | os.PathLike, *, trials: int, storage: str | None = None,
              study: str = STUDY, sampler: str | None = None, seed: int = 0, grace: int = GRACE,
              worker: int = 0, bar: bool = True, stop: StopRequest | None = None):
    """Run `trials` trials of the study (creating it on first use) into OUT/trials/, with a line per
    finished trial and (if `bar`) a progress bar for them all; returns the study."""
    import optuna

    stop = stop or StopRequest()
    chosen = make_sampler(sampler, spec, seed)
    out = Path(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or default_storage(out)
    try:
        the_study = _open_study(storage, study, chosen, grace)
    except UserError:
        if made and not any(out.iterdir()):
            out.rmdir()
        raise
    if not isinstance(chosen, optuna.samplers.GridSampler):
        start = len(the_study.get_trials(deepcopy=False))
        the_study.sampler = make_sampler(sampler, spec, sampler_seed(seed, start, worker))
    running: list[int] = []  # the trial in progress, to queue again if a signal stops it

    def objective(trial) -> float:
        running[:] = [trial.number]
        if stop.requested:  # a signal between two trials: this one fails at once, and the sweep stops
            raise Interrupted(stop.requested)
        values = {"val_split": VAL_SPLIT, **spec.fixed, **suggest(trial, spec)}
        try:
            config = TrainConfig(**values).resolved()
        except UserError as e:  # a combination the options refuse (--reject with a regression, ...)
            trial.set_user_attr("error", str(e))
            raise optuna.TrialPruned(str(e)) from None
        folder = out / "trials" / f"{trial.number:04d}"
        result = run(config, data, folder, overwrite=True, reporter=Reporter(), stop=stop)
        if result.state.stopped in SIGNALS:  # Ctrl-C or SIGTERM: this trial fails, the sweep stops
            raise Interrupted(result.state.stopped)
        steps = len(result.history.batch_loss)
        attrs = {"test_accuracy": result.test_accuracy, "train_seconds": result.history.seconds,
                 "train_flops": training_flops(config) * steps, "params": result.params, "run": str(folder)}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        objective_value = result.state.best_accuracy if result.state.best_accuracy is not None else result.test_accuracy
        shown = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        show(f"trial {trial.number}: {shown}: val {objective_value:.2%}, test {result.test_accuracy:.2%}, "
             f"{attrs['train_seconds']:.1f} s, {attrs['train_flops']:.3g} FLOPs")
        return objective_value

    # A first Ctrl-C or SIGTERM only sets a flag (inside Optuna's own bookkeeping an exception would
    # corrupt it): the running trial stops at its next step and fails, and no other trial starts.
    with stop.graceful(), SweepBar(trials, show=bar) as progress:
        show = progress.print
        try:
            the_study.optimize(objective, n_trials=trials, callbacks=[lambda *_: progress.advance()])
            late = stop.requested  # after the last trial had finished
        except Interrupted:
            for number in _retry(the_study, running):
                show(f"trial {number} stopped: queued to run again when the sweep goes on (the same command)")
            raise
        finally:  # the table shows what the study holds, however the command ends
            write_results(the_study, out, spec)
    if late:
        raise Interrupted(late)
    return the_study


class SweepBar:
    """A progress bar over the sweep's trials, with the per-trial lines printed above it."""

    def __init__(self, total: int, show: bool = True):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("trials"),
                                 TimeElapsedColumn(), disable=not show)
        self.task = self.progress.add_task("sweep", total=total)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def print(self, line: str) -> None:
        self.progress.console.print(line, highlight=False, markup=False)

    def advance(self, done: int | None = None) -> None:
        if done is None:
            self.progress.advance(self.task)
        else:
            self.progress.update(self.task, completed=done)


def _retry(study, running: list[int]) -> list[int]:
    """Queue a copy of the trial a signal stopped (it is failed by now), as Optuna's heartbeat does for
    a trial whose process died: the next trial any command starts on the study is that copy."""
    import warnings

    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    stopped = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
               if t.number in running]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for t in stopped:
            RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, t)
    return [t.number for t in stopped]


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def run_workers(args, spec: Spec):
    """`--workers W`: W processes of this command, each with its share of the trials and of the cores,
    on one study; returns the study once they are all done. Each worker is its own session, so that a
    Ctrl-C reaches it once, forwarded from here."""
    import signal
    import subprocess
    import sys
    import time

    import optuna

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or default_storage(out)
    opened = _open_study(storage, args.study, make_sampler(args.sampler, spec, args.seed), args.grace)  # created here
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    shares = [args.trials // args.workers + (k < args.trials % args.workers) for k in range(args.workers)]
    common = [sys.executable, "-m", "digitlab", "sweep", str(args.spec), "--storage", storage, "--study", args.study,
              "--seed", str(args.seed), "--out", str(out), "--threads", str(threads), "--grace", str(args.grace)]
    common += ["--sampler", args.sampler] if args.sampler else []
    common += ["--data-dir", str(args.data_dir)] if args.data_dir else []
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    before = len(opened.get_trials(deepcopy=False, states=finished))
    workers = [subprocess.Popen(common + ["--trials", str(n), "--worker", str(k)], start_new_session=True)
               for k, n in enumerate(shares) if n]
    try:
        with SweepBar(args.trials) as progress:  # the workers print their trials' lines; this counts them
            while any(w.poll() is None for w in workers):
                time.sleep(0.5)
                progress.advance(len(opened.get_trials(deepcopy=False, states=finished)) - before)
        codes = [w.wait() for w in workers]
    except Interrupted as e:  # forwarded once; each worker fails its running trial and stops
        for w in workers:
            if w.poll() is None:
                w.send_signal(getattr(signal, e.name))
        for w in workers:
            w.wait()
        raise
    finally:  # the whole study's table, however the workers ended
        the_study = optuna.load_study(study_name=args.study, storage=storage)
        write_results(the_study, out, spec)
    failed = [c for c in codes if c != 0]
    if failed:
        raise UserError(f"{len(failed)} of {len(workers)} workers failed (exit code {failed[0]}); their trials "
                        "are in trials.csv, and the same command continues the study")
    return the_study


def _open_study(storage: str, name: str, sampler, grace: int = GRACE, tries: int = 3):
    """Create the study, or load it if another command did, with a heartbeat: a trial not heard from
    for `grace` seconds is failed and queued again. Two commands creating one new SQLite database at
    once would both write its tables: a file lock beside it takes them in turn. Any database gets a
    few tries, in case another machine is creating the same study."""
    import contextlib
    import time
    import warnings

    import optuna
    from filelock import FileLock
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is ours to report, in one line
    lock = (FileLock(storage[len("sqlite:///"):] + ".lock") if storage.startswith("sqlite:///")
            else contextlib.nullcontext())
    for attempt in range(tries):
        try:
            with lock, warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                database = RDBStorage(storage, heartbeat_interval=max(1, grace // 4), grace_period=grace,
                                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(MAX_RETRY))
                return optuna.create_study(storage=database, study_name=name, load_if_exists=True,
                                           direction="maximize", sampler=sampler)
        except Exception as e:  # a bad URL, a missing driver, a database that does not answer: all say why
            if attempt == tries - 1:
                raise UserError(f"cannot open the study at {one_line(storage)}: {one_line(str(e))[:200]}") from None
            time.sleep(0.5 * (attempt + 1))


def write_results(study, out: Path, spec: Spec) -> list[Path]:
    """OUT/trials.csv, and OUT/pareto.png and .svg once two trials have finished."""
    files = [write_trials_csv(study, out / "trials.csv", spec)]
    done = [{"model": t.params.get("model", spec.fixed.get("model", "?")), **t.user_attrs}
            for t in study.trials if t.value is not None and "train_flops" in t.user_attrs]
    if len(done) >= 2:
        files += save_figure(plot_pareto(done, title=f"study {study.study_name}: {len(done)} finished trials"),
                             out / "pareto")
    return files


def write_trials_csv(study, path: Path, spec: Spec) -> Path:
    """OUT/trials.csv: one row per trial of the whole study (every process's), in trial order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "state", *spec.search, *RESULT_COLUMNS])
    for t in sorted(study.trials, key=lambda t: t.number):
        attrs = {**t.user_attrs, "retry_of": t.system_attrs.get("failed_trial", "")}
        writer.writerow([t.number, t.state.name, *(t.params.get(k, "") for k in spec.search), t.value
                         if t.value is not None else "", *(attrs.get(k, "") for k in RESULT_COLUMNS[1:])])
    return write_text(path, buffer.getvalue())


def report(out: str | os.PathLike, *, storage: str | None = None, study: str = STUDY, console=None) -> dict:
    """Print the study's best trial, its Pareto front (test error against training FLOPs) and the
    importance of each searched option (Optuna's fANOVA); returns them as a dict."""
    import optuna
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    out = Path(out)
    if storage is None and not (out / "study.db").is_file():
        raise UserError(f"no study in '{one_line(str(out))}' (no study.db); give the sweep's --out folder, or --storage")
    storage = storage or default_storage(out)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        the_study = optuna.load_study(study_name=study, storage=storage)
    except Exception as e:
        raise UserError(f"cannot read study '{study}' at {one_line(storage)}: {one_line(str(e))[:200]}") from None
    done = [t for t in the_study.trials if t.value is not None and "train_flops" in t.user_attrs]
    if not done:
        raise UserError(f"study '{study}' has no finished trial yet")
    best = max(done, key=lambda t: t.value)

    def options(t) -> str:
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())

    console.print(f"{len(done)} finished trials of {len(the_study.trials)}; best: trial {best.number} "
                  f"({options(best)}): validation {best.value:.2%}, test {best.user_attrs['test_accuracy']:.2%}")
    front = [done[i] for i in pareto_front([(t.user_attrs["train_flops"], 1 - t.user_attrs["test_accuracy"])
                                            for t in done])]
    table = Table("trial", "options", "test accuracy", "training FLOPs", "seconds", "params",
                  title="Pareto front: no other trial is both cheaper and more accurate")
    for t in front:
        a = t.user_attrs
        table.add_row(str(t.number), options(t), f"{a['test_accuracy']:.2%}", f"{a['train_flops']:.3g}",
                      f"{a['train_seconds']:.1f}", f"{a['params']:,}")
    console.print(table)
    try:
        importance = optuna.importance.get_param_importances(
            the_study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))  # not 5.0's PED-ANOVA default
    except (RuntimeError, ValueError, ImportError) as e:  # too few trials, or one choice only
        importance = {}
        console.print(f"option importance: not yet ({one_line(str(e))[:120]})")
    if importance:
        table = Table("option", "importance", title="option importance (fANOVA)")
        for key, value in importance.items():
            table.add_row(key, f"{value:.2f}")
        console.print(table)
    return {"best": best.number, "front": [t.number for t in front], "importance": importance}
