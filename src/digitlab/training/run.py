"""A run folder: one training run's files, its saved state, and resuming it.

    RUN/config.toml        the resolved options: `digitlab train --config RUN/config.toml` runs them again
    RUN/model.safetensors  the last weights, with everything needed to rebuild the model
    RUN/best.safetensors   the weights of the epoch with the best validation accuracy (with --val-split)
    RUN/state.safetensors  where training stands: weights, optimiser, schedule position, random
                           generators, epoch and batch, history; written at every epoch's end and
                           when a signal stops the run, so `--resume RUN` continues it exactly
    RUN/history.json       every batch's loss, the chapter's loss list, per-epoch figures, results
    RUN/metrics.csv        one row per epoch: losses, validation accuracy, lr, seconds, images/s
    RUN/loss.png, .svg     the loss curve
    RUN/tensorboard/       event files, with --tensorboard

Every file is written atomically (a temporary file, then a rename). The state is
safetensors plus JSON, as a checkpoint is: loading it runs no pickled code.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from digitlab.checkpoint import BEST_FILE, WEIGHTS_FILE, CheckpointMeta, read_checkpoint, save_checkpoint
from digitlab.config import CONFIG_FILE, TrainConfig, config_toml
from digitlab.data import MNIST, InMemoryLoader, fingerprint, stratified_split
from digitlab.errors import UserError
from digitlab.evaluate import evaluate, expected_calibration_error, fit_temperature, model_outputs
from digitlab.files import one_line, write_text
from digitlab.models import model_for, place
from digitlab.plots import plot_run_loss, save_figure
from digitlab.signals import Interrupted, StopRequest, stopped_by
from digitlab.tasks import get_task, probabilities
from digitlab.training import distributed
from digitlab.training.custom_steps import choose_step
from digitlab.training.distributed import SINGLE, World
from digitlab.training.loop import EPOCH_COLUMNS, Diverged, FitOptions, History, Hooks, TrainState, fit
from digitlab.training.optim import make_optimizer
from digitlab.training.reporters import ConsoleReporter, Reporter, Reporters, TensorBoardReporter
from digitlab.training.run_folder import (
    HISTORY_FILE,
    METRICS_FILE,
    STATE_FILE,
    TENSORBOARD_DIR,
    check_resumable,
    claim,
    history_record,
    read_state,
    restore,
    save_state,
)

MAX_VAL_FRACTION = 10  # validation takes at most a tenth of the training images


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA GPU here; use --device cpu or auto")
    return torch.device(device)


@dataclass
class RunResult:
    config: TrainConfig
    state: TrainState
    params: int
    test_accuracy: float
    checkpoint: Path  # the checkpoint that was scored on the test set (best, or last without validation)
    out_dir: Path
    files: list[Path]
    calibration: dict = field(default_factory=dict)  # temperature and expected calibration errors (classify)

    @property
    def history(self) -> History:
        return self.state.history


@dataclass(frozen=True)
class Split:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor | None
    val_labels: torch.Tensor | None
    info: dict  # what the run was trained on, recorded in its files and checked on resume


def split_data(data: MNIST, config: TrainConfig, reporter: Reporter | None = None) -> tuple[Split, TrainConfig]:
    """Hold out the validation images; a split over a tenth of the set shrinks to a tenth, with a notice."""
    n = len(data.train_labels)
    val = config.val_split
    if val > n // MAX_VAL_FRACTION:
        val = n // MAX_VAL_FRACTION
        (reporter or ConsoleReporter()).notice(f"validating on {val:,} images, the most --val-split may hold out: a "
                                               f"tenth of the {n:,} training images ({config.val_split:,} were asked)")
        config = replace(config, val_split=val)
    if val:
        kept, held_out = stratified_split(data.train_labels, val, config.seed)
        parts = (data.train_images[kept], data.train_labels[kept], data.train_images[held_out],
                 data.train_labels[held_out])
    else:
        parts = (data.train_images, data.train_labels, None, None)  # type: ignore[assignment]  # no validation
    info: dict = {"source": data.source, "sample": data.is_sample, "train": len(parts[1]), "val": val,
            "test": len(data.test_labels), "fingerprint": fingerprint(data)}
    if config.batch_size > info["train"]:
        raise UserError(f"batch size {config.batch_size} is larger than the {info['train']:,} training images")
    return Split(*parts, info=info), config


def _checkpoint_meta(config: TrainConfig, state: TrainState, data_info: dict, results: dict | None,
                     world: World) -> CheckpointMeta:
    return CheckpointMeta(config, epochs=len(state.history.epochs), final_loss=state.history.final_loss,
                          best_epoch=state.best_epoch, val_accuracy=state.best_accuracy, data=data_info,
                          world_size=world.size, backend=world.backend, results=results)


def write_metrics(path: Path, history: History) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EPOCH_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history.epochs)
    return write_text(path, buffer.getvalue())


def save_progress(out_dir: Path, config: TrainConfig, state: TrainState, model, optimizer,
                  augment: torch.Generator | None, data_info: dict, world: World = SINGLE) -> None:
    """What a run writes at every epoch's end and when a signal stops it: the state, the last
    weights, the best ones when this epoch is the best so far, and metrics.csv."""
    meta = _checkpoint_meta(config, state, data_info, None, world)
    save_checkpoint(out_dir / WEIGHTS_FILE, model, meta)
    if state.best_epoch is not None and state.best_epoch == state.epoch - 1 and state.batch == 0:
        save_checkpoint(out_dir / BEST_FILE, model, meta)
    write_metrics(out_dir / METRICS_FILE, state.history)
    # The state last: it is what commits the epoch, so it never names a best checkpoint not yet on disk.
    save_state(out_dir, config, state, model, optimizer, augment, data_info)


def run(config: TrainConfig, data: MNIST, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
        reporter: Reporter | None = None, stop: StopRequest | None = None, world: World = SINGLE) -> RunResult:
    """Train one model from a config (or continue the run in `out_dir`), writing its run folder.

    overwrite: replace a run that `out_dir` holds already (else that is refused).
    reporter: where the loop's output goes; the console's log lines and progress bar by default.
    Pass `Reporter()` for silence: what is recorded stays the same.
    stop: the command's Ctrl-C and SIGTERM (signals.py). world: the processes training together
    (distributed.start); rank 0 alone reports and writes the folder.
    """
    cfg = config.resolved()
    reporter = (reporter or ConsoleReporter()) if world.main else Reporter()
    split, cfg = split_data(data, cfg, reporter)
    if world.distributed and cfg.batch_size % world.size:
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly over {world.size} processes; "
                        f"give a multiple of {world.size} (it is the global batch)")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    out_dir = Path(out_dir)
    if not world.main:  # rank 0 owns the folder; the others train with it and write nothing
        record, tensors = distributed.follow(world)
        return _train(cfg, data, split, None, device, record, tensors, reporter, world, stop)
    with distributed.setting_out(world) as share:
        record = tensors = None
        if cfg.tensorboard:
            TensorBoardReporter.check_installed()  # before --overwrite removes anything
        if resume:
            check_resumable(out_dir, cfg, *read_state(out_dir), split.info)  # the whole state, nothing touched yet
        with claim(out_dir, resume=resume, overwrite=overwrite) as out_dir:
            if resume:  # again, under the lock: another process may have moved the run on since
                record, tensors = read_state(out_dir)
                check_resumable(out_dir, cfg, record, tensors, split.info)
            else:  # a resumed run says where it picks up when its loop starts
                reporter.begin(f"training {cfg.recipe()} in {one_line(str(out_dir))}")
            share((record, tensors))
            return _train(cfg, data, split, out_dir, device, record, tensors, reporter, world, stop)


def _train(cfg: TrainConfig, data: MNIST, split: Split, out_dir: Path | None, device: torch.device,
           record: dict | None, tensors: dict | None, reporter: Reporter,
           world: World = SINGLE, stop: StopRequest | None = None) -> RunResult:
    """The body of `run`, in a folder it has claimed (or, on ranks other than 0, none): build,
    restore, train."""
    task = cfg.task
    assert task is not None, "run() resolves the config first"
    model, loader, optimizer, augment, state = _build(cfg, split, device, record, tensors)
    if out_dir is not None:
        write_text(out_dir / CONFIG_FILE, config_toml(cfg))

    def validate(_) -> tuple[float, float]:  # on rank 0, which tells the others: they agree on the best epoch
        figures = None
        if world.main:
            assert split.val_images is not None and split.val_labels is not None  # else no validate hook
            result = evaluate(model, split.val_images, split.val_labels, task=task)
            figures = result.mean_loss, result.accuracy
        return distributed.from_main(world, figures)

    def save(s: TrainState) -> None:
        assert out_dir is not None  # else no save hook
        save_progress(out_dir, cfg, s, model, optimizer, augment, split.info, world)

    if cfg.tensorboard and out_dir is not None:
        reporter = Reporters(reporter, TensorBoardReporter(out_dir / TENSORBOARD_DIR))
    net = model
    if world.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step = choose_step(net, optimizer, task, fast_mlp=cfg.fast_mlp, outliers=augment if cfg.reject else None,
                       distributed=world.distributed, precision=cfg.precision, smoothing=cfg.label_smoothing)
    options = FitOptions(epochs=cfg.epochs, task=task, log_every=cfg.log_every, max_batches=cfg.max_batches,
                         schedule=cfg.schedule, augment=augment if cfg.augment else None, patience=cfg.patience,
                         precision=cfg.precision, smoothing=cfg.label_smoothing, name=cfg.model)
    hooks = Hooks(validate=validate if split.val_images is not None else None,
                  save=save if out_dir is not None else None, reporter=reporter, stop=stop or StopRequest(),
                  world=world)
    try:
        state = fit(net, loader, optimizer, options, state=state, step=step, hooks=hooks)
    except Diverged as e:
        if out_dir is not None and (out_dir / STATE_FILE).exists():
            raise Diverged(f"{e}; '{one_line(str(out_dir))}' keeps the state of the last epoch before it") from None
        raise
    if out_dir is None or state.interrupted:  # another rank's copy, or a stopped run: only its state is kept
        files = [out_dir / STATE_FILE] if out_dir is not None and (out_dir / STATE_FILE).exists() else []
        return RunResult(cfg, state, sum(p.numel() for p in model.parameters()), float("nan"), Path(),
                         out_dir or Path(), files)
    try:
        return _finish(cfg, data, split, out_dir, state, model, device, world)
    except KeyboardInterrupt as e:  # a stop while it scores and writes its results: its training is saved
        raise Interrupted(stopped_by(e) or "SIGINT", finished_in=out_dir) from None


def _build(cfg: TrainConfig, split: Split, device: torch.device, record: dict | None, tensors: dict | None):
    """The model, its loader, optimizer and augmentation generator, and the training state: new, or
    restored from a saved `record` and its `tensors`."""
    assert cfg.lr is not None, "run() resolves the config first"
    torch.manual_seed(cfg.seed)  # the weights; the loader shuffles with its own generator
    model = place(model_for(cfg, init=cfg.init), device)
    loader = InMemoryLoader(split.train_images, split.train_labels, cfg.batch_size, seed=cfg.seed, device=device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    # one generator draws the distortions and the non-digits, in the order the loop asks for them
    augment = torch.Generator().manual_seed(cfg.seed + 1) if cfg.augment or cfg.reject else None
    state = TrainState()
    if record is not None and tensors is not None:
        state = restore(record, tensors, model, optimizer, augment, device)
        if state.stopped != "patience" or cfg.patience != record["config"]["patience"]:
            state.stopped = None  # a signal's stop is over; a patience stop stands unless patience changed
    return model, loader, optimizer, augment, state


def _finish(cfg: TrainConfig, data: MNIST, split: Split, out_dir: Path, state: TrainState, model,
            device: torch.device, world: World) -> RunResult:
    """Score the test set once, on the checkpoint that `evaluate` and `predict` use (the best one
    when the run validated), and write the run's final files."""
    assert cfg.task is not None, "run() resolves the config first"
    scored, test_model, task = out_dir / WEIGHTS_FILE, model, get_task(cfg.task)
    if state.best_epoch is not None and (out_dir / BEST_FILE).is_file():
        scored = out_dir / BEST_FILE
        test_model = place(model_for(cfg), device)
        test_model.load_state_dict(read_checkpoint(scored)[0])
    final = evaluate(test_model, data.test_images, data.test_labels, task=task)
    calibration = _calibrate(test_model, split, final) if task.confident else {}
    params = sum(p.numel() for p in model.parameters())
    history = state.history
    results = _results(state, split, final, scored, params, calibration)
    last = _checkpoint_meta(cfg, state, split.info, {k: v for k, v in results.items() if not k.startswith("test_")},
                            world)
    files = [out_dir / CONFIG_FILE]
    # the temperature is fitted to the scored weights: the best ones when the run validated
    scored_meta = replace(last, results=results, temperature=calibration.get("temperature"))
    if scored.name == BEST_FILE and state.best_epoch is not None:
        best_row = history.epochs[state.best_epoch]
        files.append(save_checkpoint(scored, test_model, replace(scored_meta, epochs=state.best_epoch + 1,
                                                                 final_loss=best_row["train_loss"])))
        # the last epoch's weights are calibrated too, on the same validation split (label smoothing, for
        # one, leaves them far from calibrated): the best ones' temperature when they are the same weights
        own = calibration.get("temperature") if state.best_epoch == len(history.epochs) - 1 else (
            _temperature(model, split) if task.confident else None)
        files.append(save_checkpoint(out_dir / WEIGHTS_FILE, model, replace(last, temperature=own)))
    else:
        files.append(save_checkpoint(out_dir / WEIGHTS_FILE, model, scored_meta))
    files.append(out_dir / STATE_FILE)
    record = {"model": cfg.model, "task": cfg.task, **scored_meta.as_json(), "epochs": len(history.epochs),
              "final_loss": history.final_loss, **history_record(history)}
    files.append(write_metrics(out_dir / METRICS_FILE, history))
    files += save_figure(plot_run_loss(history, title=f"{cfg.label} ({cfg.task})"), out_dir / "loss")
    # last: it marks the run finished (resume._finished); a stop before it leaves the folder resumable
    files.append(write_text(out_dir / HISTORY_FILE, json.dumps(record, indent=1, allow_nan=False)))
    return RunResult(cfg, state, params, final.accuracy, scored, out_dir, files, calibration)


def _results(state: TrainState, split: Split, final, scored: Path, params: int, calibration: dict) -> dict:
    """What a finished run reports: the test set's figures (of the `scored` checkpoint), training's and
    the data's."""
    history = state.history
    return {
        "test_accuracy": final.accuracy,
        "test_loss": final.mean_loss,
        "test_checkpoint": scored.name,
        "best_epoch": state.best_epoch,
        "val_accuracy": state.best_accuracy,
        "epochs_completed": len(history.epochs),
        "stopped": state.stopped,
        "interrupted": state.interrupted,
        "final_loss": history.final_loss,
        "last_epoch_mean_loss": history.epoch_mean_loss[-1] if history.epochs else None,
        "seconds": history.seconds,
        "images_per_second": history.images_per_second,
        "params": params,
        "data": split.info,
        **{k: v for k, v in calibration.items() if k.startswith("test_")},
    }


def _calibrate(model, split: Split, test) -> dict:
    """The test set's expected calibration error, and with a validation split the temperature fitted
    on it and the test set's error before and after dividing the logits by it."""
    before = expected_calibration_error(probabilities(test.outputs), test.labels)
    if split.val_images is None:
        return {"test_ece": before}
    temperature = _temperature(model, split)
    if temperature is None:  # too few held-out images, or all of them right
        return {"test_ece": before, "calibration": "skipped"}
    after = expected_calibration_error(probabilities(test.outputs, temperature), test.labels)
    return {"temperature": temperature, "test_ece_uncalibrated": before, "test_ece": after}


def _temperature(model, split: Split) -> float | None:
    """The temperature that calibrates the model's logits on the validation split; None without one."""
    if split.val_images is None or split.val_labels is None:
        return None
    return fit_temperature(model_outputs(model, split.val_images), split.val_labels)
