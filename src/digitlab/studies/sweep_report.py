"""What a sweep leaves: trials.csv and the Pareto plot, written however the command ends, and the
report on a study (`digitlab sweep --report OUT`): the best trial, the Pareto front, and how much each
searched option mattered."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from digitlab.errors import UserError
from digitlab.files import one_line, write_text
from digitlab.options import SweepOptions
from digitlab.plots import pareto_front, plot_pareto, save_figure
from digitlab.studies.spec import STRUCTURE, Spec, masked, masked_url, rdb_storage, reach

# error: why a trial was pruned (its options refused, its loss diverged)
RESULT_COLUMNS = ("val_accuracy", "test_accuracy", "train_seconds", "train_flops", "params", "run", "retry_of",
                  "error")


def write_results(study, out: Path, spec: Spec) -> None:
    """OUT/trials.csv, and OUT/pareto.png and .svg once two trials have finished."""
    write_trials_csv(study, out / "trials.csv", spec)
    done = [{"model": trial_label(t, spec), **t.user_attrs}
            for t in study.trials if t.value is not None and "train_flops" in t.user_attrs]
    if len(done) >= 2:
        save_figure(plot_pareto(done, title=f"study {study.study_name}: {len(done)} finished trials"), out / "pareto")


def trial_label(trial, spec: Spec) -> str:
    """A trial's model and searched structure: 'mlp hidden=100,100 activation=relu'."""
    model = trial.params.get("model", spec.fixed.get("model", "cnn"))
    return " ".join([str(model)] + [f"{k.removeprefix(STRUCTURE)}={v}" for k, v in trial.params.items()
                                     if k.startswith(STRUCTURE)])


def write_trials_csv(study, path: Path, spec: Spec) -> Path:
    """OUT/trials.csv: one row per trial of the whole study (every process's), in trial order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "state", *spec.search, *RESULT_COLUMNS])
    for t in sorted(study.trials, key=lambda t: t.number):
        attrs = {**t.user_attrs, "val_accuracy": t.value, "retry_of": t.system_attrs.get("failed_trial", "")}
        writer.writerow([t.number, t.state.name, *(t.params.get(k, "") for k in spec.search),
                         *(attrs.get(k, "") for k in RESULT_COLUMNS)])  # csv writes None as ""
    return write_text(path, buffer.getvalue())


def report(out: str | os.PathLike, *, storage: str | None = None, study: str = SweepOptions.study,
           console=None) -> dict:
    """Print the study's best trial, its Pareto front (test error against training FLOPs) and the
    importance of each searched option (Optuna's fANOVA); returns them as a dict."""
    import optuna
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    out = Path(out)
    if storage is None and not (out / "study.db").is_file():
        raise UserError(f"no study in '{one_line(str(out))}' (no study.db); give the sweep's --out folder, or "
                        "--storage")
    storage = SweepOptions(out=out, storage=storage).storage_url()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    reach(storage)  # a database server that refuses or never answers: one line, not a hang
    try:
        the_study = optuna.load_study(study_name=study, storage=rdb_storage(storage))
    except Exception as e:  # noqa: BLE001 -- no such study, tables of another version: one line
        raise UserError(f"cannot read study '{one_line(study)}' at {masked_url(storage)}: "
                        f"{masked(str(e), storage)[:200]}") from None
    done = [t for t in the_study.trials if t.value is not None and "train_flops" in t.user_attrs]
    if not done:
        raise UserError(f"study '{study}' has no finished trial yet")
    best = max(done, key=lambda t: t.value or 0.0)  # every one of them has a value

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
