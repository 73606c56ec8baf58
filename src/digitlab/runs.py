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

import contextlib
import csv
import io
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from . import distributed
from .checkpoint import BEST_FILE, WEIGHTS_FILE, save_checkpoint
from .config import CONFIG_FILE, FIELDS, TASK_OUTPUTS, TrainConfig, check_value, config_toml
from .data import MNIST, PIXEL_CENTER, PIXEL_SCALE, InMemoryLoader, fingerprint, stratified_split
from .errors import UserError
from .fast_mlp import HandWrittenMLPStep
from .files import PART_SUFFIX, one_line, prepare_out_dir, regular_file, write_safetensors, write_text
from .loop import EPOCH_COLUMNS, ConsoleReporter, Diverged, History, Reporter, Reporters, TensorBoardReporter, TrainState, fit
from .models import create_model, place
from .optim import make_optimizer

STATE_FILE = "state.safetensors"
STATE_KEY = "digitlab_state"
STATE_FORMAT = 1
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"
# Everything a run (and `evaluate` on it) writes into its folder; --overwrite removes these.
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, BEST_FILE, STATE_FILE, HISTORY_FILE, METRICS_FILE, "loss.png", "loss.svg",
             "confusion.png", "confusion.svg", "worst.png", "worst.svg", TENSORBOARD_DIR)
MAX_VAL_FRACTION = 10  # validation takes at most a tenth of the training images
# What `--resume` may change: how long the run goes on, and where it runs. Anything else
# would make the resumed run a different run.
RESUMABLE = ("epochs", "patience", "device", "tensorboard")


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


# ---------------------------------------------------------------------------- the folder

def holds_run(folder: Path) -> bool:
    """Whether `folder` holds (part of) a run already, or a comparison's results."""
    return any((folder / name).exists() for name in (*RUN_FILES, "results.json"))


def fresh_run_dir(base: str | os.PathLike) -> Path:
    """`base` if it holds no run yet, else the first of base-2, base-3, ... that holds none."""
    base = Path(base)
    candidate, n = base, 1
    while holds_run(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


@contextlib.contextmanager
def claim(out_dir: Path, *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Make `out_dir` this run's own for as long as the block runs.

    Refuses a folder that holds another run (unless `overwrite`, which removes that run's
    files first) and one that another process is training into (a lock), sweeps stale
    temporary files a killed run left, and if the block fails before a state was saved,
    removes what it wrote (and the folder, if it made it): no half-written run is left.
    """
    from filelock import FileLock, Timeout

    created = not out_dir.exists()
    out_dir = prepare_out_dir(out_dir)
    lock = FileLock(out_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"'{one_line(str(out_dir))}' is in use: another digitlab run is writing into it; wait "
                        "for it to finish or choose another --out") from None
    try:
        if not resume and holds_run(out_dir):
            if not overwrite:
                raise UserError(f"'{one_line(str(out_dir))}' holds a run already; pass --overwrite to replace it, "
                                "--resume to continue it, or --out for another folder")
            for name in RUN_FILES:
                path = out_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for litter in out_dir.glob(f".*{PART_SUFFIX}"):  # from a run killed while it saved
            litter.unlink(missing_ok=True)
        try:
            yield out_dir
        except BaseException:
            if not (out_dir / STATE_FILE).exists():
                for name in RUN_FILES:
                    path = out_dir / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                if created:
                    shutil.rmtree(out_dir, ignore_errors=True)
            raise
    finally:
        lock.release()


# ---------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Split:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor | None
    val_labels: torch.Tensor | None
    info: dict  # what the run was trained on, recorded in its files and checked on resume


def split_data(data: MNIST, config: TrainConfig) -> tuple[Split, TrainConfig]:
    """Hold out the validation images; a split over a tenth of the set shrinks to a tenth, with a notice."""
    n = len(data.train_labels)
    val = config.val_split
    if val > n // MAX_VAL_FRACTION:
        val = n // MAX_VAL_FRACTION
        print(f"digitlab: validating on {val:,} images, a tenth of the {n:,} training images "
              f"(--val-split {config.val_split:,} asks for more)", file=sys.stderr)
        config = replace(config, val_split=val)
    if val:
        kept, held_out = stratified_split(data.train_labels, val, config.seed)
        parts = (data.train_images[kept], data.train_labels[kept], data.train_images[held_out],
                 data.train_labels[held_out])
    else:
        parts = (data.train_images, data.train_labels, None, None)
    info = {"source": data.source, "sample": data.is_sample, "train": len(parts[1]), "val": val,
            "test": len(data.test_labels), "fingerprint": fingerprint(data)}
    if config.batch_size > info["train"]:
        raise UserError(f"batch size {config.batch_size} is larger than the {info['train']:,} training images")
    return Split(*parts, info=info), config


# ---------------------------------------------------------------------------- the state file

def _pack(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure for `obj`, with its tensors moved into `tensors` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"$tensor": key}
    if isinstance(obj, dict):  # as pairs: the optimiser's state is keyed by int, which JSON would make str
        return {"$dict": [[k, _pack(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_pack(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if isinstance(obj, dict) and "$dict" in obj:
        return {k: _unpack(v, tensors) for k, v in obj["$dict"]}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def _history_dict(history: History) -> dict:
    # A shallow dict: dataclasses.asdict would deep-copy 10,000s of floats at every save.
    return {**{f.name: getattr(history, f.name) for f in fields(History)},
            "epoch_mean_loss": history.epoch_mean_loss, "images_per_second": history.images_per_second}


def history_from(record: Any, source: str | os.PathLike = "history") -> History:
    """A History from a history.json's contents (or a state's), checked: one line if it is not one."""
    def numbers(key: str) -> list:
        values = record.get(key, [])
        if not isinstance(values, list) or not all(type(v) in (int, float) for v in values):
            raise UserError(f"{one_line(str(source))}: '{key}' is not a list of numbers; not a digitlab history")
        return values

    if not isinstance(record, dict) or "loss_list" not in record:
        raise UserError(f"{one_line(str(source))}: not a digitlab training history (no loss_list); pass a run "
                        "folder made by `digitlab train`")
    loss_list, batch_loss, log_steps = numbers("loss_list"), numbers("batch_loss"), numbers("log_steps")
    if not batch_loss:  # an older history: the logged losses are all there is
        batch_loss, log_steps = loss_list, list(range(len(loss_list)))
    epochs = record.get("epochs", [])
    return History(loss_list=loss_list, batch_loss=batch_loss, log_steps=log_steps,
                   log_points=[tuple(p) for p in record.get("log_points", []) if isinstance(p, list)],
                   epochs=epochs if isinstance(epochs, list) else [],
                   images=record.get("images", 0), seconds=record.get("seconds", 0.0))


def _saved_history(record: dict) -> History:
    """The History a state file holds, field by field, exactly as it was."""
    history = History(**{f.name: record[f.name] for f in fields(History)})
    history.log_points = [tuple(p) for p in history.log_points]
    return history


def save_state(run_dir: Path, config: TrainConfig, state: TrainState, model, optimizer,
               augment: torch.Generator | None, data_info: dict) -> Path:
    """Everything needed to continue the run, in one file written atomically."""
    tensors: dict[str, torch.Tensor] = {}
    rng = {"shuffle": state.shuffle, "torch": torch.get_rng_state(),
           "augment": augment.get_state() if augment is not None else None}
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        rng["cuda"] = torch.cuda.get_rng_state()
    record = {
        "format": STATE_FORMAT,
        "config": asdict(config),
        "data": data_info,
        "position": {k: getattr(state, k) for k in ("epoch", "batch", "step", "best_accuracy", "best_epoch",
                                                     "stopped")},
        "history": _history_dict(state.history),
        "model": _pack(model.state_dict(), "model", tensors),
        "optimizer": _pack(optimizer.state_dict(), "optimizer", tensors),
        "rng": _pack(rng, "rng", tensors),
    }
    return write_safetensors(run_dir / STATE_FILE, tensors, {STATE_KEY: json.dumps(record, allow_nan=False)})


def read_state(run_dir: str | os.PathLike, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, tensors) of a run folder's state, with one clear line for anything wrong.

    tensors=False reads the JSON record alone (and returns no tensors): enough to check a resume.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    if not run_dir.is_dir():
        raise UserError(f"cannot resume '{run_dir}': not a folder; pass a run folder made by `digitlab train`")
    if not path.is_file():
        raise UserError(f"cannot resume '{run_dir}': it holds no {STATE_FILE}; pass a run folder made by "
                        "`digitlab train`")
    broken = f"cannot resume '{run_dir}': {STATE_FILE} is corrupt"
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(STATE_KEY)
        loaded = load_file(str(path)) if tensors else {}
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise TypeError("the record is not a table")
        if record.get("format") != STATE_FORMAT:
            raise UserError(f"cannot resume '{run_dir}': state format {record.get('format')!r}, this digitlab "
                            f"reads format {STATE_FORMAT}; train it again")
        TrainConfig(**record["config"]).resolved()
        missing = [k for k in ("data", "position", "history", "model", "optimizer", "rng") if k not in record]
        if missing:
            raise KeyError(missing[0])
        position, data = record["position"], record["data"]
        if not (isinstance(position, dict) and isinstance(data, dict) and "stopped" in position
                and all(isinstance(position.get(k), int) for k in ("epoch", "batch", "step"))):
            raise ValueError("no valid epoch, batch, step and data")
    except UserError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise UserError(f"{broken} ({type(e).__name__}: {one_line(str(e))[:100]}); train it again into a new "
                        "folder") from None
    return record, loaded


def resume_config(run_dir: str | os.PathLike, given: dict[str, Any]) -> TrainConfig:
    """The saved run's config with the options a user gave on top; only RESUMABLE ones may differ."""
    record, _ = read_state(run_dir, tensors=False)
    saved = TrainConfig(**record["config"])
    for key, value in given.items():
        if key not in FIELDS:
            raise UserError(f"unknown option '{key}'")
        if key not in RESUMABLE and value != getattr(saved, key):
            raise UserError(
                f"cannot resume '{run_dir}' with {key} = {value!r}: the run was trained with {getattr(saved, key)!r}; "
                f"--resume may change only {', '.join(RESUMABLE)} (start a new run to change the rest)")
    return replace(saved, **{k: check_value(k, v) for k, v in given.items() if k in RESUMABLE})


def _check_resumable(run_dir: Path, config: TrainConfig, record: dict, data_info: dict) -> None:
    saved = TrainConfig(**record["config"])
    different = [k for k in FIELDS if k not in RESUMABLE and getattr(config, k) != getattr(saved, k)]
    if different:
        k = different[0]
        raise UserError(f"cannot resume '{run_dir}' with {k} = {getattr(config, k)!r}: the run was trained with "
                        f"{getattr(saved, k)!r}")
    if any(data_info[k] != record["data"].get(k) for k in ("train", "val", "test", "fingerprint")):
        raise UserError(f"cannot resume '{run_dir}': it was trained on other data ({record['data'].get('source')}, "
                        f"{record['data'].get('train')} training images); pass the same --data-dir")
    position = record["position"]
    done, stopped = position["epoch"], position["stopped"]
    if config.epochs < done or (config.epochs == done and position["batch"] > 0):
        trained = f"{done} epochs and part of another" if position["batch"] else f"{done} epochs"
        raise UserError(f"cannot resume '{run_dir}' with {config.epochs} epochs: it has already trained {trained}")
    if config.epochs != saved.epochs and saved.schedule != "none":
        raise UserError(f"cannot extend '{run_dir}' from {saved.epochs} to {config.epochs} epochs: its "
                        f"{saved.schedule} schedule was planned over {saved.epochs} and would change the steps "
                        "already taken; start a new run with the epochs you want")
    if not _finished(run_dir, done):
        return  # killed after its last epoch, before its final files: resuming writes them
    if stopped == "patience" and config.patience == saved.patience:
        raise UserError(f"'{run_dir}' stopped early after epoch {done - 1}: no better validation accuracy for "
                        f"{saved.patience} epochs; pass a larger --patience (or 0) to train on")
    if done == config.epochs and stopped != "patience":
        raise UserError(f"'{run_dir}' has finished all {done} epochs; pass --epochs N (more than {done}) "
                        "to train it further")


def _finished(run_dir: Path, epochs_done: int) -> bool:
    """Whether the run wrote its final files (history.json) after the state's last epoch, not on a stop."""
    try:
        results = json.loads((run_dir / HISTORY_FILE).read_text(encoding="utf-8")).get("results") or {}
        return results.get("epochs_completed") == epochs_done and not results.get("interrupted")
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------------------- a run

def _checkpoint_meta(config: TrainConfig, state: TrainState, data_info: dict, results: dict | None) -> dict:
    world = distributed.current()
    return {
        "model": config.model,
        "task": config.task,
        "num_outputs": TASK_OUTPUTS[config.task],
        "normalization": {"center": PIXEL_CENTER, "scale": PIXEL_SCALE},
        "epochs": len(state.history.epochs),
        "seed": config.seed,
        "final_loss": state.history.final_loss,
        "best_epoch": state.best_epoch,
        "val_accuracy": state.best_accuracy,
        "config": asdict(config),
        "data": data_info,
        "world_size": world.size,  # how it was trained: processes, and their backend (null for one)
        "backend": world.backend,
        "results": results,
    }


def write_metrics(path: Path, history: History) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EPOCH_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history.epochs)
    return write_text(path, buffer.getvalue())


def save_progress(out_dir: Path, config: TrainConfig, state: TrainState, model, optimizer,
                  augment: torch.Generator | None, data_info: dict) -> None:
    """What a run writes at every epoch's end and when a signal stops it: the state, the last
    weights, the best ones when this epoch is the best so far, and metrics.csv."""
    meta = _checkpoint_meta(config, state, data_info, None)
    save_checkpoint(out_dir / WEIGHTS_FILE, model, meta)
    if state.best_epoch is not None and state.best_epoch == state.epoch - 1 and state.batch == 0:
        save_checkpoint(out_dir / BEST_FILE, model, meta)
    write_metrics(out_dir / METRICS_FILE, state.history)
    # The state last: it is what commits the epoch, so it never names a best checkpoint not yet on disk.
    save_state(out_dir, config, state, model, optimizer, augment, data_info)


def run(config: TrainConfig, data: MNIST, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
        reporter: Reporter | None = None) -> RunResult:
    """Train one model from a config (or continue the run in `out_dir`), writing its run folder.

    overwrite: replace a run that `out_dir` holds already (else that is refused).
    reporter: where the loop's output goes; the console's log lines and progress bar by default.
    Pass `Reporter()` for silence: what is recorded stays the same.
    """
    cfg = config.resolved()
    split, cfg = split_data(data, cfg)
    world = distributed.current()
    if world.distributed and cfg.batch_size % world.size:
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly over {world.size} processes; "
                        f"give a multiple of {world.size} (it is the global batch)")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    out_dir = Path(out_dir)
    if not world.main:  # rank 0 owns the folder; the others train with it and write nothing
        record, tensors = distributed.follow(world)
        return _train(cfg, data, split, None, device, record, tensors, Reporter(), world)
    with distributed.setting_out(world) as share:
        record = tensors = None
        if cfg.tensorboard:
            TensorBoardReporter.check_installed()  # before --overwrite removes anything
        if resume:
            _check_resumable(out_dir, cfg, read_state(out_dir, tensors=False)[0], split.info)  # nothing touched yet
        with claim(out_dir, resume=resume, overwrite=overwrite) as out_dir:
            if resume:  # again, under the lock: another process may have moved the run on since
                record, tensors = read_state(out_dir)
                _check_resumable(out_dir, cfg, record, split.info)
            share((record, tensors))
            return _train(cfg, data, split, out_dir, device, record, tensors, reporter, world)


def _train(cfg: TrainConfig, data: MNIST, split: Split, out_dir: Path | None, device: torch.device,
           record: dict | None, tensors: dict | None, reporter: Reporter | None,
           world: distributed.World = distributed.SINGLE) -> RunResult:
    """The body of `run`, in a folder it has claimed (or, on ranks other than 0, none): build,
    restore, train."""
    from .evaluate import evaluate

    torch.manual_seed(cfg.seed)  # the weights; the loader shuffles with its own generator
    model = place(create_model(cfg.model, num_outputs=TASK_OUTPUTS[cfg.task], init=cfg.init), device)
    loader = InMemoryLoader(split.train_images, split.train_labels, cfg.batch_size, seed=cfg.seed, device=device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    # one generator draws the distortions and the non-digits, in the order the loop asks for them
    augment = torch.Generator().manual_seed(cfg.seed + 1) if cfg.augment or cfg.reject else None
    state = TrainState()
    if record is not None:
        state = _restore(record, tensors, model, optimizer, augment, device)
        if state.stopped != "patience" or cfg.patience != record["config"]["patience"]:
            state.stopped = None  # a signal's stop is over; a patience stop stands unless patience changed
    if out_dir is not None:
        write_text(out_dir / CONFIG_FILE, config_toml(cfg))

    def validate(_) -> tuple[float, float]:  # on rank 0, which tells the others: they agree on the best epoch
        figures = None
        if world.main:
            result = evaluate(model, split.val_images, split.val_labels, task=cfg.task)
            figures = result.mean_loss, result.accuracy
        return distributed.from_main(world, figures)

    def save(s: TrainState) -> None:
        save_progress(out_dir, cfg, s, model, optimizer, augment, split.info)

    if reporter is None:
        reporter = ConsoleReporter()
    if cfg.tensorboard and out_dir is not None:
        reporter = Reporters(reporter, TensorBoardReporter(out_dir / TENSORBOARD_DIR))
    # The hand-written step knows nothing of non-digits (--reject trains through autograd), of other
    # processes (under DistributedDataParallel the gradients are autograd's, all-reduced) or of bf16.
    fast_step = (HandWrittenMLPStep.for_model(model, optimizer, cfg.task)
                 if cfg.fast_mlp and not cfg.reject and not world.distributed and cfg.precision == "fp32" else None)
    net = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    try:
        state = fit(net, loader, optimizer, epochs=cfg.epochs, task=cfg.task, state=state,
                    log_every=cfg.log_every, max_batches=cfg.max_batches, schedule=cfg.schedule,
                    augment=augment if cfg.augment else None, outliers=augment if cfg.reject else None,
                    validate=validate if split.val_images is not None else None, patience=cfg.patience,
                    fast_step=fast_step, reporter=reporter, save=save if out_dir is not None else None,
                    name=cfg.model, world=world, precision=cfg.precision)
    except Diverged as e:
        if out_dir is not None and (out_dir / STATE_FILE).exists():
            raise Diverged(f"{e}; '{one_line(str(out_dir))}' keeps the state of the last epoch before it") from None
        raise
    if out_dir is None:  # another rank's copy: rank 0 scores the test set and writes the files
        return RunResult(cfg, state, sum(p.numel() for p in model.parameters()), float("nan"), Path(), Path(), [])
    return _finish(cfg, data, split, out_dir, state, model, device)


def _finish(cfg: TrainConfig, data: MNIST, split: Split, out_dir: Path, state: TrainState, model,
            device: torch.device) -> RunResult:
    """Score the test set once, on the checkpoint that `evaluate` and `predict` use (the best one
    when the run validated), and write the run's final files."""
    from .checkpoint import read_checkpoint
    from .evaluate import evaluate
    from .plots import plot_run_loss, save_figure

    scored, test_model = out_dir / WEIGHTS_FILE, model
    if state.best_epoch is not None and (out_dir / BEST_FILE).is_file():
        scored = out_dir / BEST_FILE
        test_model = place(create_model(cfg.model, num_outputs=TASK_OUTPUTS[cfg.task]), device)
        test_model.load_state_dict(read_checkpoint(scored)[0])
    final = evaluate(test_model, data.test_images, data.test_labels, task=cfg.task)
    calibration = _calibrate(test_model, split, final) if cfg.task == "classify" else {}
    params = sum(p.numel() for p in model.parameters())
    history = state.history
    results = {
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
    meta = _checkpoint_meta(cfg, state, split.info, results)
    if "temperature" in calibration:  # fitted to the scored weights: the best ones when the run validated
        meta["temperature"] = calibration["temperature"]
    files = [out_dir / CONFIG_FILE]
    if scored.name == BEST_FILE:
        best_row = history.epochs[state.best_epoch]
        files.append(save_checkpoint(scored, test_model, {**meta, "epochs": state.best_epoch + 1,
                                                          "final_loss": best_row["train_loss"]}))
        last_results = {k: v for k, v in results.items() if not k.startswith("test_")}
        last_meta = {k: v for k, v in meta.items() if k != "temperature"}
        files.append(save_checkpoint(out_dir / WEIGHTS_FILE, model, {**last_meta, "results": last_results}))
    else:
        files.append(save_checkpoint(out_dir / WEIGHTS_FILE, model, meta))
    files.append(out_dir / STATE_FILE)
    files.append(write_text(out_dir / HISTORY_FILE, json.dumps({**meta, **_history_dict(history)}, indent=1,
                                                               allow_nan=False)))
    files.append(write_metrics(out_dir / METRICS_FILE, history))
    files += save_figure(plot_run_loss(history, title=f"{cfg.model} ({cfg.task})"), out_dir / "loss")
    return RunResult(cfg, state, params, final.accuracy, scored, out_dir, files, calibration)


def _calibrate(model, split: Split, test) -> dict:
    """The test set's expected calibration error, and with a validation split the temperature fitted
    on it and the test set's error before and after dividing the logits by it."""
    from .calibrate import expected_calibration_error, fit_temperature, probabilities
    from .evaluate import model_outputs

    before = expected_calibration_error(probabilities(test.outputs), test.labels)
    if split.val_images is None:
        return {"test_ece": before}
    temperature = fit_temperature(model_outputs(model, split.val_images), split.val_labels)
    if temperature is None:  # too few held-out images, or all of them right
        return {"test_ece": before, "calibration": "skipped"}
    after = expected_calibration_error(probabilities(test.outputs, temperature), test.labels)
    return {"temperature": temperature, "test_ece_uncalibrated": before, "test_ece": after}


def _restore(record: dict, tensors: dict, model, optimizer, augment, device) -> TrainState:
    """Put the saved weights, optimiser state and random generators back; returns the saved position."""
    try:
        model.load_state_dict(_unpack(record["model"], tensors))
        optimizer.load_state_dict(_unpack(record["optimizer"], tensors))
        rng = _unpack(record["rng"], tensors)
        torch.set_rng_state(rng["torch"])
        if augment is not None:
            augment.set_state(rng["augment"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        position = record["position"]
        return TrainState(epoch=position["epoch"], batch=position["batch"], step=position["step"],
                          shuffle=rng["shuffle"], best_accuracy=position["best_accuracy"],
                          best_epoch=position["best_epoch"], stopped=position["stopped"],
                          history=_saved_history(record["history"]))
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"cannot resume: {STATE_FILE} does not fit this run ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}); train it again into a new folder") from None


def read_history(path: str | Path) -> dict:
    """A run's history.json, from the file or its run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.exists():
        raise UserError(f"no training history at '{one_line(str(path))}'; pass a run folder made by "
                        "`digitlab train`")
    try:
        return json.loads(regular_file(path, "history").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{one_line(str(path))}: not a readable history file ({one_line(str(e))[:100]})") from None
