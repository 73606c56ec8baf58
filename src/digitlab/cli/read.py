"""`digitlab evaluate` and `digitlab predict`: a trained model reads the test set, or your pictures."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from digitlab.cli.options import load_data, report_files, rich_console
from digitlab.errors import ExitCode, UserError
from digitlab.files import one_line

if TYPE_CHECKING:
    from digitlab.stop import StopRequest


def cmd_evaluate(args: argparse.Namespace, stop: StopRequest) -> int:
    import json

    from rich.table import Table

    from digitlab.files import prepare_out_dir
    from digitlab.plots import plot_confusion, plot_digit_grid, save_figure
    from digitlab.reading.calibrate import expected_calibration_error
    from digitlab.reading.checkpoint import describe, load_checkpoint, resolve
    from digitlab.reading.evaluate import data_note, evaluate
    from digitlab.tasks import probabilities

    model, meta = load_checkpoint(args.checkpoint)
    info = sys.stderr if args.json else sys.stdout
    print(f"checkpoint: {describe(args.checkpoint, meta)}", file=info)
    data = load_data(args.data_dir, stream=info)
    note = data_note(meta, data, allow_overlap=args.allow_overlap)
    if note:
        print(note, file=info)
    out = prepare_out_dir(args.out or resolve(args.checkpoint).parent)
    result = evaluate(model, data.test_images, data.test_labels, meta["task"],
                      normalization=meta.get("normalization"))
    report = {"model": meta["model"], "task": meta["task"], "checkpoint": str(resolve(args.checkpoint)),
              "data": data.source, "sample": data.is_sample, "note": note, **result.as_dict()}
    if result.task.confident:
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
    console = rich_console()
    console.print(f"{title}; mean loss {result.mean_loss:.4f}")
    if result.task.confident:
        how = (f"with temperature {meta['temperature']:.3f}" if meta.get("temperature") is not None
               else "not calibrated (no temperature in this checkpoint: a run's best.safetensors has one when "
                    "it was trained with --val-split)")
        console.print(f"confidence: expected calibration error {report['calibration_error']:.2%}, {how}")
    table = Table("digit", "precision", "recall", "test images", title="per digit")
    for digit, (p, r) in enumerate(zip(report["precision"], report["recall"])):
        table.add_row(str(digit), f"{p:.4f}", f"{r:.4f}", f"{sum(report['confusion'][digit]):,}")
    console.print(table)
    report_files(files)
    return 0


def cmd_predict(args: argparse.Namespace, stop: StopRequest) -> int:
    import json

    from PIL import Image
    from rich.table import Table

    from digitlab.files import prepare_out_dir, write_atomic
    from digitlab.reading.checkpoint import describe, load_checkpoint
    from digitlab.reading.image import expand_inputs
    from digitlab.reading.predict import predict_files, preprocessed_names
    from digitlab.tasks import get_task

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
        rich_console().print(table)
        if get_task(meta["task"]).confident and meta.get("temperature") is None:
            print("note: this checkpoint has no calibration temperature (a run's best.safetensors has one when it "
                  "was trained with --val-split): its confidences are the plain softmax's")
    return ExitCode.USAGE if any(p.error for p in predictions) else 0
