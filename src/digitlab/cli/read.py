"""`digitlab evaluate` and `digitlab predict`: a trained model reads the test set, or your pictures.

The library is imported inside each command function, not at the top: `digitlab --help` builds
every parser here without loading torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from digitlab.cli.common import load_data, report_files, rich_console
from digitlab.errors import ExitCode, UserError
from digitlab.files import one_line
from digitlab.options import ReadOptions, add_options, data_dir_option, option, out_option

if TYPE_CHECKING:
    from digitlab.signals import StopRequest


@dataclass
class EvaluateOptions:
    checkpoint: Path = option(None, "a run folder or its model.safetensors", kind=Path, flag="", metavar="CHECKPOINT")
    data_dir: Path | None = data_dir_option()
    out: Path | None = out_option("folder for confusion.png and worst.png (default: the checkpoint's folder)")
    worst: int = option(24, "how many misclassified test digits to draw, most confidently wrong first",
                        minimum=0, metavar="N")
    json: bool = option(False, "print the results as JSON (accuracy as a fraction)")
    allow_overlap: bool = option(False, "score a model on digits it was trained on (the offline sample, for a "
                                        "model trained on the full set); refused by default, because that measures "
                                        "memory, not accuracy")


@dataclass
class PredictOptions(ReadOptions):
    checkpoint: Path = option(None, "a run folder or its model.safetensors; `digitlab train --preset best` makes "
                                    "the model that reads real handwriting best", kind=Path, flag="",
                              metavar="CHECKPOINT")
    inputs: list = option(None, "PNG, JPEG, BMP or WebP files, or folders of them", kind=str, flag="", nargs="+",
                          metavar="IMAGE_OR_FOLDER")
    json: bool = option(False, "print a JSON list of {file, text, sure, digit, confidence, top3, digits}: text is "
                               "the digits read left to right (the best guess, sure or not), digits has each one's "
                               "digit, confidence, sure, top3 and box [x0, y0, x1, y1]; digit and top3 are null "
                               "unless there is one digit, confidence is the whole text's; confidence and sure are "
                               "null for regression models")
    single: bool = option(False, "read each picture as one digit, however many blobs of ink it has (default: "
                                 "read every digit in a row, left to right)")
    save_preprocessed: Path | None = option(
        None, "write the 28x28 pictures the network saw for each input into DIR, side by side when there are "
              "several (default: don't)", kind=Path, metavar="DIR")


def add_evaluate_parser(commands) -> None:
    p = commands.add_parser("evaluate", help="test accuracy, per-digit precision and recall, confusion matrix")
    add_options(p, EvaluateOptions)
    p.set_defaults(func=cmd_evaluate)


def add_predict_parser(commands) -> None:
    p = commands.add_parser("predict", help="read digits and numbers from your own photos, scans or drawings")
    add_options(p, PredictOptions)
    p.set_defaults(func=cmd_predict)


def cmd_evaluate(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.checkpoint import describe, load_checkpoint, resolve
    from digitlab.evaluate import data_note, evaluate, expected_calibration_error
    from digitlab.files import prepare_out_dir
    from digitlab.tasks import probabilities

    model, meta = load_checkpoint(args.checkpoint)
    info = sys.stderr if args.json else sys.stdout
    print(f"checkpoint: {describe(args.checkpoint, meta)}", file=info)
    data = load_data(args.data_dir, say=lambda line: print(line, file=info))
    note = data_note(meta, data, allow_overlap=args.allow_overlap)
    if note:
        print(note, file=info)
    out = prepare_out_dir(args.out or resolve(args.checkpoint).parent)
    result = evaluate(model, data.test_images, data.test_labels, meta.task, normalization=meta.normalization)
    report = {"model": meta.model, "task": meta.task.name, "checkpoint": str(resolve(args.checkpoint)),
              "data": data.source, "sample": data.is_sample, "note": note, **result.as_dict()}
    if meta.task.confident:
        report["temperature"] = meta.temperature
        report["calibration_error"] = expected_calibration_error(
            probabilities(result.outputs, meta.temperature), result.labels)
        report["calibration_error_uncalibrated"] = expected_calibration_error(
            probabilities(result.outputs), result.labels)
    title = f"{meta.model} ({meta.task.name}): {result.accuracy:.2%} of {len(result.labels):,}"
    report["files"] = [str(f) for f in _evaluation_figures(result, data, report, title, out, args.worst)]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_evaluation(report, title, result.mean_loss, meta)
    return 0


def _evaluation_figures(result, data, report: dict, title: str, out: Path, worst: int) -> list[Path]:
    """confusion.png (and .svg), and worst.png: the most confidently wrong test digits."""
    from digitlab.plots import plot_confusion, plot_digit_grid, save_figure

    files = save_figure(plot_confusion(report["confusion"], title=title), out / "confusion")
    wrong = result.worst(worst)
    if len(wrong):
        captions = [f"true {int(result.labels[i])}, said {int(result.predictions[i])}" for i in wrong]
        grid = plot_digit_grid(data.test_images[wrong].numpy(), captions, title="most confidently wrong")
        files += save_figure(grid, out / "worst")
    return files


def _print_evaluation(report: dict, title: str, mean_loss: float, meta) -> None:
    from rich.table import Table

    from digitlab.evaluate import ece_change

    console = rich_console()
    console.print(f"{title}; mean loss {mean_loss:.4f}")
    if meta.task.confident:
        if meta.temperature is not None:
            change = ece_change(report["calibration_error_uncalibrated"], report["calibration_error"])
            # print, not the console: rich would fold the long line at 80 columns in a pipe
            print(f"confidence: temperature {meta.temperature:.3f}; expected calibration error {change}")
        else:
            console.print(f"confidence: expected calibration error {report['calibration_error']:.2%}, not calibrated "
                          "(no temperature in this checkpoint: a classifier trained with --val-split gets one; older "
                          "runs wrote it into best.safetensors alone)")
    table = Table("digit", "precision", "recall", "test images", title="per digit")
    for digit, (p, r) in enumerate(zip(report["precision"], report["recall"])):
        table.add_row(str(digit), f"{p:.4f}", f"{r:.4f}", f"{sum(report['confusion'][digit]):,}")
    console.print(table)
    report_files(report["files"])


def cmd_predict(args: argparse.Namespace, stop: StopRequest) -> int:
    from rich.table import Table
    from rich.text import Text

    from digitlab.checkpoint import describe, load_checkpoint
    from digitlab.reading.image import expand_inputs
    from digitlab.reading.predict import predict_files

    model, meta = load_checkpoint(args.checkpoint)
    print(f"checkpoint: {describe(args.checkpoint, meta)}", file=sys.stderr if args.json else sys.stdout)
    files = expand_inputs(args.inputs)
    if not files:
        raise UserError("no image files in " + ", ".join(map(one_line, args.inputs)) + "; give PNG, JPEG, BMP "
                        "or WebP files")
    predictions = predict_files(model, meta, files, single=args.single, threshold=args.threshold)
    failed = [p for p in predictions if p.error]
    for p in failed:
        print(f"digitlab: error: {one_line(p.error or '')}", file=sys.stderr)
    read = [p for p in predictions if p.error is None]
    unsaved = _save_preprocessed(args.save_preprocessed, predictions, files) if args.save_preprocessed and read else 0
    if args.json:  # the real file names: JSON escapes what a terminal must not see raw
        print(json.dumps([p.as_dict() for p in predictions], indent=1))
    elif read:  # no table at all when no picture could be read: the error lines say it all
        table = Table("file", "read", "confidence", "next best")
        for p in read:
            confidence = "-" if p.confidence is None else f"{p.confidence:.1%}"
            guesses = p.guesses(3)
            text = p.text if p.sure is not False else f"not sure: {' or '.join(guesses[:2])}"
            # Text, not a string: rich would read '[' in a file name as markup; one_line: a newline or a
            # right-to-left override in a name is shown escaped, as in the error lines
            table.add_row(Text(one_line(p.file)), text, confidence, ", ".join(guesses[1:]))
        rich_console().print(table)
        if meta.task.confident and meta.temperature is None:
            print("note: this checkpoint has no calibration temperature (a classifier trained with --val-split "
                  "gets one; older runs wrote it into best.safetensors alone): its confidences are the plain "
                  "softmax's")
    return ExitCode.USAGE if failed or unsaved else 0


def _save_preprocessed(folder: Path, predictions, files: list[Path]) -> int:
    """Write the 28x28 pictures of the inputs that were read into `folder`; returns how many could not be
    written. Each failure is one error line and costs only its own picture."""
    from PIL import Image

    from digitlab.files import prepare_out_dir, write_atomic
    from digitlab.reading.predict import preprocessed_names

    def fail(error: UserError) -> int:
        print(f"digitlab: error: {one_line(str(error))}", file=sys.stderr)
        return 1

    try:
        prepare_out_dir(folder, option="--save-preprocessed")
    except UserError as e:
        return fail(e)
    unsaved = 0
    for p, name in zip(predictions, preprocessed_names(files)):
        if p.error is None:
            try:
                def save(tmp, image=p.image) -> None:
                    Image.fromarray(image).save(tmp, format="PNG")

                write_atomic(folder / name, save)
            except UserError as e:
                unsaved += fail(e)
    return unsaved
