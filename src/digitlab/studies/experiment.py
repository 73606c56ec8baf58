"""The chapter's whole experiment: summarise and train two structures, then compare them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from digitlab.config import TrainConfig
from digitlab.data import MNIST
from digitlab.errors import UserError
from digitlab.files import one_line, prepare_out_dir, write_text
from digitlab.models import create_model
from digitlab.plots import plot_compare, save_figure
from digitlab.reading.evaluate import SAMPLE_WORDS
from digitlab.stop import StopRequest
from digitlab.studies.model_summary import summary
from digitlab.tasks import get_task
from digitlab.training.folder import holds_training
from digitlab.training.run import RunResult, run

COLUMNS = ("model", "params", "final loss", "last-epoch mean loss", "test accuracy", "wall time (s)", "images/s")


@dataclass
class CompareResult:
    runs: list[RunResult]
    rows: list[dict]
    files: list[Path]

    @property
    def interrupted(self) -> bool:
        return any(r.state.interrupted for r in self.runs)


def results_row(result: RunResult) -> dict:
    h = result.history
    return {
        "model": result.config.model,
        "params": result.params,
        "final loss": None if h.final_loss is None else round(h.final_loss, 4),
        "last-epoch mean loss": round(h.epoch_mean_loss[-1], 4) if h.epoch_mean_loss else None,
        # A regression model's answer is its output rounded to a digit (see evaluate.predicted_digits).
        "test accuracy": f"{result.test_accuracy:.2%}",
        "wall time (s)": round(h.seconds, 2),
        "images/s": round(h.images_per_second),
    }


def _cell(value) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def compare(configs: list[TrainConfig], data: MNIST, out_dir: str | Path, console=None, reporter=None,
            overwrite: bool = False, stop: StopRequest | None = None) -> CompareResult:
    """For each config, in the chapter's order: print the summary, then train into out_dir/MODEL.

    Then write the two-loss plot (out_dir/compare.png, .svg) and the results table
    (results.md, results.json). Stops early, keeping what finished, on Ctrl-C.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    out_dir = Path(out_dir)
    if holds_training(out_dir):
        raise UserError(f"'{one_line(str(out_dir))}' holds a training run; a comparison writes a folder per model "
                        "and its plot beside them: choose another --out")
    out_dir = prepare_out_dir(out_dir)
    runs: list[RunResult] = []
    for cfg in configs:
        cfg = cfg.resolved()
        summary(create_model(cfg.model, num_outputs=get_task(cfg.task).outputs), console=console)
        runs.append(run(cfg, data, out_dir / cfg.model, overwrite=overwrite, reporter=reporter, stop=stop))
        if runs[-1].state.interrupted:
            break
    files = [f for r in runs for f in r.files]
    rows = [results_row(r) for r in runs if not r.state.interrupted]  # a stopped run keeps its state, no row
    if len(runs) == 2 and not runs[-1].state.interrupted:
        first, second = runs
        fig = plot_compare((first.config.model, second.config.model),
                           (first.history.loss_list, second.history.loss_list),
                           (first.config.log_every, second.config.log_every))
        files += save_figure(fig, out_dir / "compare")
    note = f"Figures from {SAMPLE_WORDS}, not comparable with full-MNIST figures.\n\n" if data.is_sample else ""
    files.append(write_text(out_dir / "results.md", note + markdown_table(rows)))
    files.append(write_text(out_dir / "results.json", json.dumps(
        {"data": data.source, "sample": data.is_sample, "rows": rows}, indent=1)))

    table = Table(title="results" + (f" (on {SAMPLE_WORDS}: not comparable with full MNIST)" if data.is_sample else ""))
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in COLUMNS))
    console.print(table)
    return CompareResult(runs, rows, files)
