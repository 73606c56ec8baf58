"""Figures: a run's loss curve, the chapter's two-run comparison, and the sigmoid.

Figures are built with matplotlib's object API (no pyplot), so nothing needs a window
or a display, and a notebook still shows the returned Figure.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from digitlab.files import write_atomic

# With HOME's folders not writable (read-only, HOME=/proc/...), matplotlib makes itself a temporary folder, removes
# it at exit, and says so in warnings from the function that looks for its folder: library noise on stderr. The
# filter goes on before matplotlib looks for its folder.
logging.getLogger("matplotlib").addFilter(lambda record: record.funcName != "_get_config_or_cache_dir")

from matplotlib.figure import Figure  # noqa: E402 -- after the filter above, which must come first

# The chapter's colours: a magenta solid line and a light-pink dashed one.
COLOR_1, COLOR_2 = "#e4007f", "#f19ec2"
FORMATS = ("png", "svg")


def save_figure(fig: Figure, stem: str | Path) -> list[Path]:
    """Write `stem`.png and `stem`.svg atomically; returns their paths."""
    stem = Path(stem)
    if stem.suffix.lower() in (".png", ".svg"):
        stem = stem.with_suffix("")
    return [write_atomic(stem.with_name(f"{stem.name}.{fmt}"),
                         partial(fig.savefig, format=fmt, dpi=100, bbox_inches="tight")) for fmt in FORMATS]


def _label_axes(fig: Figure, title: str | None, every: int | None = None) -> Figure:
    """The chapter's axes: "freq" (one point per logged batch, every `every` batches) against "loss",
    whole numbers on the x axis."""
    from matplotlib.ticker import MaxNLocator

    ax = fig.axes[0]
    ax.set_xlabel("freq" + (f" (the loss of batch 0, {every:,}, {2 * every:,}, ... of each epoch)"
                            if type(every) is int and every > 0 else ""), fontsize="large")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss", fontsize="large")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper right", fontsize="x-large")
    return fig


def plot_loss(loss_list: Sequence[float], title: str | None = None) -> Figure:
    """One run's loss, one point per logged batch (the chapter's `plot(loss_list)`)."""
    fig = Figure(figsize=(8, 4.5))
    fig.add_subplot().plot(range(len(loss_list)), loss_list, color=COLOR_1, label="Train loss")
    return _label_axes(fig, title)


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """A centred moving average over `window` values (shorter at the ends), as long as `values`."""
    array = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(array) < 3:
        return array
    kernel = np.ones(window)
    return np.convolve(array, kernel, "same") / np.convolve(np.ones_like(array), kernel, "same")


def plot_run_loss(history, title: str | None = None) -> Figure:
    """A run's loss at every batch (light), smoothed, and the chapter's logged points on top.

    history: a loop.History. However short the run, there is at least one batch to draw.
    """
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    losses = history.batch_loss
    steps = np.arange(len(losses))
    ax.plot(steps, losses, color=COLOR_2, linewidth=0.7, alpha=0.8, label="every batch")
    if len(losses) >= 10:
        window = max(5, len(losses) // 25)
        ax.plot(steps, smooth(losses, window), color=COLOR_1, linewidth=1.8, label=f"mean of {window} batches")
    if history.log_steps:
        ax.plot(history.log_steps, history.loss_list, "o", color="#5a0030", markersize=4,
                label="logged (the chapter's points)")
    ax.set(xlabel="batch", ylabel="loss")
    if len(losses) and min(losses) > 0 and max(losses) / min(losses) > 50:
        ax.set_yscale("log")  # a regression's loss falls from ~30 to under 1: a log axis shows both ends
    if title:
        ax.set_title(title)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def plot_two_losses(
    loss_list_1: Sequence[float],
    loss_list_2: Sequence[float],
    labels: tuple[str, str] = ("Train loss1", "Train loss2"),
    title: str | None = None,
    every: int | None = None,
) -> Figure:
    """The chapter's side-by-side: solid #e4007f for the first run, dashed #f19ec2 for the second; a point
    every `every` batches (the runs' --log-every), where known."""
    return _plot_losses((loss_list_1, loss_list_2), labels, title, every)


def _plot_losses(losses: Sequence[Sequence[float]], labels: Sequence[str], title: str | None,
                 every: int | None) -> Figure:
    """Loss curves in one axes: the chapter's two styles first, then matplotlib's colours, dash-dotted."""
    fig = Figure(figsize=(10, 5))
    ax = fig.add_subplot()
    styles = [(COLOR_1, "-"), (COLOR_2, "--")] + [(f"C{k}", "-.") for k in range(len(losses))]
    for loss, label, (color, style) in zip(losses, labels, styles):
        ax.plot(range(len(loss)), loss, color=color, linestyle=style, label=label)
    fig = _label_axes(fig, title, every)
    if len(losses) > 2:  # the chapter's large legend would hide the curves
        ax.legend(loc="upper right", fontsize="medium")
    return fig


def plot_compare(models: Sequence[str], losses: Sequence[Sequence[float]],
                 every: Sequence[int | None] = ()) -> Figure:
    """Runs' loss curves side by side, labelled by their models (`digitlab compare`, `plot compare`), the
    first two in the chapter's styles; the batches are named where every run logged at the same --log-every."""
    labels = [f"Train loss{k} ({name})" for k, name in enumerate(models, 1)]
    title = f"training loss: {', '.join(models[:-1])} and {models[-1]}"
    return _plot_losses(losses, labels, title, every[0] if every and len(set(every)) == 1 else None)


def plot_sigmoid() -> Figure:
    """The chapter's sigmoid curve, on x = -8, -7.8, ..., 7.8."""
    x = np.arange(-8, 8, 0.2)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(x, 1.0 / (1.0 + np.exp(-x)))
    ax.set(xlabel="x", ylabel="sigmoid(x)")
    ax.grid(alpha=0.3)
    return fig


def plot_confusion(confusion: Sequence[Sequence[int]], title: str | None = None) -> Figure:
    """Counts of true (rows) against predicted (columns) digits, each cell labelled."""
    counts = np.asarray(confusion)
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    # log scale so that the few errors stay visible next to ~1,000 correct answers per digit
    shown = ax.imshow(np.log1p(counts), cmap="RdPu")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            light = np.log1p(n) > 0.6 * np.log1p(counts.max())
            ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if light else "black")
    ax.set(xticks=range(len(counts)), yticks=range(len(counts)), xlabel="predicted digit", ylabel="true digit",
           title=title or "confusion matrix")
    fig.colorbar(shown, ax=ax, label="log(1 + count)")
    return fig


def plot_digit_grid(images: np.ndarray, captions: Sequence[str], title: str | None = None, cols: int = 8) -> Figure:
    """28x28 uint8 digits (ink high) in a grid, each with a caption."""
    rows = max(1, -(-len(images) // cols))
    fig = Figure(figsize=(cols * 1.3, rows * 1.5 + 0.4))
    for k, (image, caption) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, error) that no other point beats on both (lower is better),
    in order of cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(trials: Sequence[dict], title: str | None = None) -> Figure:
    """Test error (log axis) against training FLOPs and against wall time, one colour per model,
    with the Pareto front of each panel drawn and its points labelled: the MNIST Battleground view.

    trials: dicts with model, test_accuracy, train_flops, train_seconds (finished trials only)."""
    fig = Figure(figsize=(12, 5), layout="constrained")
    models = sorted({t["model"] for t in trials})
    colours = {m: f"C{k}" for k, m in enumerate(models)}
    error = [max(1 - t["test_accuracy"], 1e-4) for t in trials]
    for ax, key, label in zip(fig.subplots(1, 2), ("train_flops", "train_seconds"),
                              ("training FLOPs (counted)", "training wall time (s)")):
        cost = [t[key] for t in trials]
        for m in models:
            mine = [i for i, t in enumerate(trials) if t["model"] == m]
            ax.scatter([cost[i] for i in mine], [error[i] for i in mine], color=colours[m], label=m, alpha=0.8)
        front = pareto_front(list(zip(cost, error)))
        ax.step([cost[i] for i in front], [error[i] for i in front], where="post", color="black", lw=1,
                label="Pareto front")
        for i in front:
            ax.annotate(f"{trials[i]['model']} {1 - error[i]:.2%}", (cost[i], error[i]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="test error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
