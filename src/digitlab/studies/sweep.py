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

A trial that diverges (its loss NaN or infinite) is a result, not the sweep's end: it is pruned, with
the reason in its `error` attribute (trials.csv's error column), as a combination the options refuse
is, and the sweep goes on to its other trials.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

from digitlab.config import VAL_SPLIT, TrainConfig
from digitlab.errors import UserError
from digitlab.files import one_line
from digitlab.options import STORAGE_ENV, SweepOptions, as_argv
from digitlab.signals import SIGNALS, Interrupted, StopRequest
from digitlab.studies.model_summary import training_flops
from digitlab.studies.spec import Spec, make_sampler, masked, masked_url, rdb_storage, reach, sampler_seed, suggest
from digitlab.studies.sweep_report import write_results
from digitlab.training.loop import Diverged
from digitlab.training.reporters import Reporter
from digitlab.training.run import run
from digitlab.training.threads import usable_cores

MAX_RETRY = 3  # copies of one stopped trial, at most


def run_sweep(spec: Spec, data, options: SweepOptions, *, bar: bool = True, stop: StopRequest | None = None):
    """Run `options.trials` trials of the study (creating it on first use) into OUT/trials/, with a line
    per finished trial and (if `bar`) a progress bar for them all; returns the study."""
    stop = stop or StopRequest()
    the_study, out = _join(spec, options)
    running: list[int] = []  # the trial in progress, to queue again if a signal stops it
    # A first Ctrl-C or SIGTERM only sets a flag (inside Optuna's own bookkeeping an exception would
    # corrupt it): the running trial stops at its next step and fails, and no other trial starts.
    with stop.graceful(), SweepBar(options.trials, show=bar) as progress:
        objective = _objective(spec, data, out, stop, running, progress.print)
        try:
            the_study.optimize(objective, n_trials=options.trials, callbacks=[lambda *_: progress.advance()])
            late = stop.requested  # after the last trial had finished
        except Interrupted:
            for number in _retry(the_study, running):
                progress.print(f"trial {number} stopped: queued to run again when the sweep goes on (the same "
                               "command)")
            raise
        finally:  # the table shows what the study holds, however the command ends
            write_results(the_study, out, spec)
    if late:
        raise Interrupted(late)
    return the_study


def _join(spec: Spec, options: SweepOptions):
    """(the study, OUT): the study made on first use, with this command's own sampler seed."""
    import optuna

    chosen = make_sampler(options.sampler, spec, options.seed)
    the_study, out = _create(options, chosen)
    if not isinstance(chosen, optuna.samplers.GridSampler):
        start = len(the_study.get_trials(deepcopy=False))
        the_study.sampler = make_sampler(options.sampler, spec, sampler_seed(options.seed, start, options.worker))
    return the_study, out


def _create(options: SweepOptions, sampler):
    """(the study, OUT): OUT made, and the study opened in it (or at --storage); a study that cannot be
    opened leaves no OUT behind that this command made."""
    out = Path(options.out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _open_study(options.storage_url(), options.study, sampler, options.grace), out
    except BaseException:  # a UserError, or a signal while a database server keeps us waiting
        if made and not any(out.iterdir()):
            out.rmdir()
        raise


def _objective(spec: Spec, data, out: Path, stop: StopRequest, running: list[int], show):
    """Optuna's objective: one trial is one run folder; its validation accuracy is the value."""
    import optuna

    def objective(trial) -> float:
        def pruned(error: UserError) -> optuna.TrialPruned:
            """The trial ends pruned, its reason in its `error` attribute and in its line."""
            reason = one_line(str(error))
            trial.set_user_attr("error", reason)
            show(f"trial {trial.number}: {shown}: pruned: {reason}")
            return optuna.TrialPruned(reason)

        running[:] = [trial.number]
        if stop.requested:  # a signal between two trials: this one fails at once, and the sweep stops
            raise Interrupted(stop.requested)
        values = {"val_split": VAL_SPLIT, **spec.fixed, **suggest(trial, spec)}
        shown = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        folder = out / "trials" / f"{trial.number:04d}"
        try:
            config = TrainConfig(**values).resolved()
        except UserError as e:  # a combination the options refuse (--reject with a regression, ...)
            raise pruned(e) from None
        try:
            result = run(config, data, folder, overwrite=True, reporter=Reporter(), stop=stop)
        except Diverged as e:  # the loss became NaN or infinite: this point's answer, and the sweep goes on
            raise pruned(e) from None
        if result.state.stopped in SIGNALS:  # Ctrl-C or SIGTERM: this trial fails, the sweep stops
            raise Interrupted(result.state.stopped)
        steps = len(result.history.batch_loss)
        attrs = {"test_accuracy": result.test_accuracy, "train_seconds": result.history.seconds,
                 "train_flops": training_flops(config) * steps, "params": result.params, "run": str(folder)}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        value = result.state.best_accuracy if result.state.best_accuracy is not None else result.test_accuracy
        show(f"trial {trial.number}: {shown}: val {value:.2%}, test {result.test_accuracy:.2%}, "
             f"{attrs['train_seconds']:.1f} s, {attrs['train_flops']:.3g} FLOPs")
        return value

    return objective


class SweepBar:
    """A progress bar over the sweep's trials, with the per-trial lines printed above it."""

    def __init__(self, total: int, show: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    stopped = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
               if t.number in running]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for t in stopped:
            RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, t)
    return [t.number for t in stopped]


def run_workers(spec: Spec, options: SweepOptions):
    """`--workers W`: W processes of this command, each with its share of the trials and of the cores,
    on one study; returns the study once they are all done. Each worker is its own session, so that a
    Ctrl-C reaches it once, forwarded from here."""
    import optuna

    storage = options.storage_url()
    the_study, out = _create(options, make_sampler(options.sampler, spec, options.seed))  # created here, once
    threads = max(1, usable_cores() // options.workers)
    each, more = divmod(options.trials, options.workers)
    shares = [each + (k < more) for k in range(options.workers)]

    def command(worker: int, trials: int) -> list[str]:
        mine = replace(options, trials=trials, workers=1, worker=worker, threads=threads, storage=None, out=out)
        return [sys.executable, "-m", "digitlab", "sweep", *as_argv(mine)]

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    before = len(the_study.get_trials(deepcopy=False, states=finished))
    # the storage URL goes in the environment, not on the command line, where `ps` would show its password
    env = {**os.environ, STORAGE_ENV: storage}
    workers = [subprocess.Popen(command(k, n), env=env, start_new_session=True) for k, n in enumerate(shares) if n]
    try:
        with SweepBar(options.trials) as progress:  # the workers print their trials' lines; this counts them
            while any(w.poll() is None for w in workers):
                time.sleep(0.5)
                progress.advance(len(the_study.get_trials(deepcopy=False, states=finished)) - before)
        codes = [w.wait() for w in workers]
    except Interrupted as e:  # forwarded once; each worker fails its running trial and stops
        for w in workers:
            if w.poll() is None:
                w.send_signal(getattr(signal, e.name))
        for w in workers:
            w.wait()
        raise
    finally:  # the whole study's table, however the workers ended
        write_results(the_study, out, spec)
    failed = [c for c in codes if c != 0]
    if failed:
        raise UserError(f"{len(failed)} of {len(workers)} workers failed (exit code {failed[0]}); their trials "
                        "are in trials.csv, and the same command continues the study")
    return the_study


def _open_study(storage: str, name: str, sampler, grace: int, tries: int = 3):
    """Create the study, or load it if another command did, with a heartbeat: a trial not heard from
    for `grace` seconds is failed and queued again. Two commands creating one new SQLite database at
    once would both write its tables: a file lock beside it takes them in turn. Any database gets a
    few tries, in case another machine is creating the same study."""
    import optuna
    from filelock import FileLock
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import ArgumentError

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is ours to report, in one line
    # a Ctrl-C inside a query makes SQLAlchemy log "Error closing cursor" with a traceback: the command's
    # own line says what happened
    logging.getLogger("sqlalchemy").setLevel(logging.CRITICAL)
    reach(storage)  # a database server that refuses or never answers: one line now, not a retry or a hang
    lock = (FileLock(storage[len("sqlite:///"):] + ".lock") if storage.startswith("sqlite:///")
            else contextlib.nullcontext())
    for attempt in range(tries):
        try:
            with lock, warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                database = rdb_storage(storage, heartbeat_interval=max(1, grace // 4), grace_period=grace,
                                       heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(MAX_RETRY))
                return optuna.create_study(storage=database, study_name=name, load_if_exists=True,
                                           direction="maximize", sampler=sampler)
        except Exception as e:  # noqa: BLE001 -- a bad URL, a missing driver, a race: all say why
            if attempt == tries - 1 or isinstance(e, (ArgumentError, ImportError)):  # a bad URL, no such driver
                raise UserError(f"cannot open the study at {masked_url(storage)}: {masked(str(e), storage)[:200]}"
                                ) from None
            time.sleep(0.5 * (attempt + 1))
