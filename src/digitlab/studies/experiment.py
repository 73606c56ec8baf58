"""The chapter's whole experiment: summarise and train two structures (or more), then compare them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from digitlab.config import TrainConfig
from digitlab.data import MNIST
from digitlab.errors import UserError
from digitlab.evaluate import SAMPLE_WORDS
from digitlab.files import one_line, prepare_out_dir, write_text
from digitlab.models import model_for
from digitlab.plots import plot_compare, save_figure
from digitlab.signals import StopRequest
from digitlab.structures import folder_name
from digitlab.studies.model_summary import summary, training_flops
from digitlab.training.loop import Diverged
from digitlab.training.run import RunResult, run
from digitlab.training.run_folder import holds_training

COLUMNS = ("model", "params", "training FLOPs", "final loss", "last-epoch mean loss", "test accuracy", "wall time (s)",
           "images/s")


@dataclass
class CompareResult:
    runs: list[RunResult]
    rows: list[dict]
    files: list[Path]

    @property
    def interrupted(self) -> bool:
        return any(r.state.interrupted for r in self.runs)


def results_row(result: RunResult, label: str) -> dict:
    h = result.history
    return {
        "model": label,
        "params": result.params,
        # one step's forward and backward, counted by torch (model_summary.training_flops), times the steps
        "training FLOPs": f"{training_flops(result.config) * len(h.batch_loss):.3g}",
        "final loss": None if h.final_loss is None else round(h.final_loss, 4),
        "last-epoch mean loss": round(h.epoch_mean_loss[-1], 4) if h.epoch_mean_loss else None,
        # A regression model's answer is its output rounded to a digit (see evaluate.predicted_digits).
        "test accuracy": f"{result.test_accuracy:.2%}",
        "wall time (s)": round(h.seconds, 2),
        "images/s": round(h.images_per_second),
    }


def diverged_row(label: str, model, error: Diverged) -> dict:
    """The row of a run whose loss became NaN or infinite: its size, and where it diverged."""
    where = str(error).split(":", 1)[0]  # "diverged at epoch 0, batch 8"
    return {**dict.fromkeys(COLUMNS), "model": label, "params": sum(p.numel() for p in model.parameters()),
            "test accuracy": where}


def _cell(value) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def check_labels(labels: list[str]) -> None:
    """Each model or structure once: two with one label would share a folder and a curve."""
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice is not None:
        raise UserError(f"compare got '{twice}' twice; give each model or structure once")


def compare(configs: list[TrainConfig], data: MNIST, out_dir: str | Path, console=None, reporter=None,
            overwrite: bool = False, stop: StopRequest | None = None, labels: list[str] | None = None) -> CompareResult:
    """For each config, in the chapter's order: print the summary, then train into out_dir/LABEL, where
    LABEL names the model and what its structure changes ('mlp', 'mlp_hidden=100'), or is given.

    Then write the loss plot (out_dir/compare.png, .svg) and the results table (results.md,
    results.json). Stops early, keeping what finished, on Ctrl-C.
    """
    from rich.console import Console

    console = console or Console()
    out_dir = Path(out_dir)
    configs = [cfg.resolved() for cfg in configs]
    labels = labels or [cfg.label for cfg in configs]
    check_labels(labels)
    if holds_training(out_dir):
        raise UserError(f"'{one_line(str(out_dir))}' holds a training run; a comparison writes a folder per model "
                        "and its plot beside them: choose another --out")
    out_dir = prepare_out_dir(out_dir)
    runs: list[RunResult] = []
    rows, finished = [], []  # a diverged run is a row and no curve; a stopped one neither
    for cfg, label in zip(configs, labels):
        model = model_for(cfg)
        summary(model, console=console, title=None if label == cfg.model else f"{type(model).__name__}: {label}")
        try:
            result = run(cfg, data, out_dir / folder_name(label), overwrite=overwrite, reporter=reporter, stop=stop)
        except Diverged as e:  # one structure's answer (ReLU at the chapter's rate, say): the others still run
            console.print(f"{label}: {e}", markup=False, highlight=False)
            rows.append(diverged_row(label, model, e))
            continue
        runs.append(result)
        if result.state.interrupted:
            break
        rows.append(results_row(result, label))
        finished.append((label, result))
    files = [f for r in runs for f in r.files]
    if len(finished) >= 2:
        fig = plot_compare([label for label, _ in finished], [r.history.loss_list for _, r in finished],
                           [r.config.log_every for _, r in finished])
        files += save_figure(fig, out_dir / "compare")
    note = f"Figures from {SAMPLE_WORDS}, not comparable with full-MNIST figures.\n\n" if data.is_sample else ""
    files.append(write_text(out_dir / "results.md", note + markdown_table(rows)))
    files.append(write_text(out_dir / "results.json", json.dumps(
        {"data": data.source, "sample": data.is_sample, "rows": rows}, indent=1)))
    console.print(results_table(rows, data.is_sample))
    return CompareResult(runs, rows, files)


def results_table(rows: list[dict], sample: bool):
    """The results as a rich table, for the terminal."""
    from rich.table import Table

    table = Table(title="results" + (f" (on {SAMPLE_WORDS}: not comparable with full MNIST)" if sample else ""))
    for column in COLUMNS:  # the model whole, on one line; the figures may wrap
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=column == "model")
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in COLUMNS))
    return table
