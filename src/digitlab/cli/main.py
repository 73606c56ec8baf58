"""The `digitlab` command: the parser, wired from one module per command, and `main(argv)`.

Bad input ends in one line on stderr and exit code 2; Ctrl-C in exit code 130 (143 for SIGTERM)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from digitlab import __version__
from digitlab.cli.options import (
    ModelNames,
    add_data_dir,
    add_training_options,
    non_negative_int,
    opset,
    port,
    seconds,
    threshold,
    trials,
    workers,
)
from digitlab.cli.read import cmd_evaluate, cmd_predict
from digitlab.cli.serve import cmd_export, cmd_serve
from digitlab.cli.show import (
    cmd_plot_compare,
    cmd_plot_loss,
    cmd_plot_sigmoid,
    cmd_summary,
)
from digitlab.cli.sweep import cmd_sweep
from digitlab.cli.train import cmd_compare, cmd_train
from digitlab.config import THRESHOLD
from digitlab.errors import ExitCode, UserError
from digitlab.files import one_line
from digitlab.stop import StopRequest, stopped_by


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from digitlab.config import TASKS

    parser = _Parser(
        prog="digitlab",
        description="Learn and compare neural-network structures on handwritten digits (MNIST).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("summary", help="print a model's layer table, as the chapter's paddle.summary")
    p.add_argument("model", choices=ModelNames(), metavar="MODEL", help="one of: %(choices)s")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="regress: 1 output; classify: 10 outputs (default: the model's, regress for mlp and cnn)")
    p.set_defaults(func=cmd_summary)

    p = commands.add_parser("train", help="train one model with the chapter's loop and save it")
    p.add_argument("model", nargs="?", choices=ModelNames(), metavar="MODEL",
                   help="one of: %(choices)s (default: the preset's, cnn for the chapter)")
    add_training_options(p, default_out="runs/MODEL", resume=True)
    p.add_argument("--nproc", type=workers, default=None, metavar="N",
                   help="train on N processes on this machine (DistributedDataParallel, gloo on the CPU, nccl on "
                        "CUDA), started as torchrun does; --batch-size is the global batch (default: one process)")
    p.add_argument("--nnodes", type=workers, default=1, metavar="M",
                   help="with --nproc: M machines train together, each running this same command (default: 1)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="with --nnodes: where the machines meet (torchrun's c10d rendezvous), the same on all")
    p.add_argument("--rdzv-timeout", type=seconds, default=300, metavar="SECONDS",
                   help="with --nnodes: how long to wait for the other machines (default: %(default)s)")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("compare", help="the chapter's experiment: summarise, train and plot two models")
    p.add_argument("models", nargs=2, choices=ModelNames(), metavar="MODEL", help="two of: %(choices)s")
    add_training_options(p, default_out="runs/compare")
    p.set_defaults(func=cmd_compare)

    p = commands.add_parser("evaluate", help="test accuracy, per-digit precision and recall, confusion matrix")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a run folder or its model.safetensors")
    add_data_dir(p)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for confusion.png and worst.png (default: the checkpoint's folder)")
    p.add_argument("--worst", type=non_negative_int, default=24, metavar="N",
                   help="how many misclassified test digits to draw, most confidently wrong first (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (accuracy as a fraction)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="score a model on digits it was trained on (the offline sample, for a model trained on "
                        "the full set); refused by default, because that measures memory, not accuracy")
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("predict", help="read digits and numbers from your own photos, scans or drawings")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                   help="a run folder or its model.safetensors; `digitlab train --preset best` makes the model "
                        "that reads real handwriting best")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="PNG, JPEG, BMP or WebP files, or folders of them")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {file, text, sure, digit, confidence, top3, digits}: text is the digits "
                        "read left to right (the best guess, sure or not), digits has each one's digit, confidence, "
                        "sure, top3 and box [x0, y0, x1, y1]; digit and top3 are null unless there is one digit, "
                        "confidence is the whole text's; confidence and sure are null for regression models")
    p.add_argument("--single", action="store_true",
                   help="read each picture as one digit, however many blobs of ink it has (default: read every "
                        "digit in a row, left to right)")
    p.add_argument("--threshold", type=threshold, default=THRESHOLD, metavar="P",
                   help="a digit read with a (calibrated) confidence below P is 'not sure' (default: %(default)s)")
    p.add_argument("--save-preprocessed", type=Path, default=None, metavar="DIR",
                   help="write the 28x28 pictures the network saw for each input into DIR, side by side when "
                        "there are several (default: don't)")
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("sweep", help="many runs at once on Optuna: which structure and recipe is best for a budget")
    p.add_argument("spec", type=Path, metavar="SPEC.toml", nargs="?",
                   help="[fixed] options every trial shares and [search] options to choose: a list of choices or "
                        "a range { low = ..., high = ..., log = true }, under the names of a run's config.toml")
    p.add_argument("--report", type=Path, default=None, metavar="OUT",
                   help="instead of running trials, report on the study in OUT (or --storage): the best trial, the "
                        "Pareto front and how much each searched option mattered")
    p.add_argument("--trials", type=trials, default=10, help="trials this command runs (default: %(default)s)")
    p.add_argument("--workers", type=workers, default=1,
                   help="processes on this machine, each running its share of the trials with the cores divided "
                        "among them (default: %(default)s)")
    p.add_argument("--threads", type=workers, default=None, help=argparse.SUPPRESS)  # set by --workers
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # which of them, for its sampler's seed
    p.add_argument("--storage", default=None, metavar="URL",
                   help="the study's database, shared by every command that joins it, e.g. "
                        "postgresql://user:password@host/db (default: sqlite:///OUT/study.db)")
    p.add_argument("--study", default="digitlab", help="the study's name in the storage (default: %(default)s)")
    p.add_argument("--grace", type=seconds, default=60, metavar="SECONDS",
                   help="a running trial not heard from for this long (its process killed, its machine lost) is "
                        "failed, and a copy of it queued for the next command (default: %(default)s)")
    p.add_argument("--sampler", choices=("grid", "random", "tpe"), default=None,
                   help="grid takes the whole product of the lists; random and tpe draw (default: grid when every "
                        "searched option is a list, else tpe)")
    p.add_argument("--seed", type=int, default=0,
                   help="random and tpe: the sampler's seed, mixed with the trials the study already holds and "
                        "the worker's index, so that a continued study or a second worker draws new points; give "
                        "each machine its own (a grid runs in one fixed order) (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with the four MNIST files")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"),
                   help="OUT: trials/ (one run folder per trial), trials.csv, study.db (default: %(default)s)")
    p.set_defaults(func=cmd_sweep)

    p = commands.add_parser("serve", help="a local web page: draw a digit and watch every loaded model read it")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="run folders (or checkpoints) to load; the first one answers in large (`digitlab train "
                        "--preset best` makes the model that reads real handwriting best)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--threshold", type=threshold, default=THRESHOLD, metavar="P",
                   help="an answer with a (calibrated) confidence below P is 'not sure' (default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("export", help="write a run's model as ONNX, for onnxruntime and other tools")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder (its best checkpoint) or a checkpoint")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=opset, default=17, help="ONNX opset, 17 or newer (default: %(default)s)")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("plot", help="draw a loss curve, a two-run comparison, or the sigmoid")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    k = kinds.add_parser("loss", help="one run's loss curve")
    k.add_argument("run", type=Path, metavar="RUN", help="a run folder (or its history.json)")
    k.add_argument("--out", type=Path, default=None,
                   help="file name without extension; writes .png and .svg (default: RUN/loss)")
    k.set_defaults(func=cmd_plot_loss)
    k = kinds.add_parser("compare", help="two runs' losses in the chapter's style")
    k.add_argument("runs", type=Path, nargs=2, metavar="RUN", help="two run folders (or history.json files)")
    k.add_argument("--out", type=Path, default=Path("runs/plots/compare"),
                   help="file name without extension; writes .png and .svg (default: %(default)s)")
    k.set_defaults(func=cmd_plot_compare)
    k = kinds.add_parser("sigmoid", help="the chapter's sigmoid curve")
    k.add_argument("--out", type=Path, default=Path("runs/plots/sigmoid"),
                   help="file name without extension; writes .png and .svg (default: %(default)s)")
    k.set_defaults(func=cmd_plot_sigmoid)
    return parser



def main(argv: list[str] | None = None, stop: StopRequest | None = None) -> int:
    """Run one command; returns its exit code (errors.ExitCode). `stop` is the entry point's, else one
    is made and installed here."""
    stop = stop or StopRequest().install()
    try:
        args = build_parser().parse_args(argv)
        args.argv = sys.argv[1:] if argv is None else list(argv)
        importlib.import_module("torch")  # every command's libraries come with torch (and numpy) ...
        stop.check()  # ... and a signal that one of them swallowed while loading stops the command here
        return args.func(args, stop)
    except UserError as e:
        print(f"digitlab: error: {one_line(str(e))}", file=sys.stderr)
        return ExitCode.USAGE
    except (KeyboardInterrupt, Exception) as e:  # a signal, or a library's error wrapped around one
        name = stopped_by(e)
        if name is None:
            raise
        print(f"digitlab: interrupted ({name})", file=sys.stderr)
        return ExitCode[name]
