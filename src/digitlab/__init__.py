"""digitlab: learn and compare neural-network structures on handwritten digits.

The Python API mirrors the course chapter's notebook:

    from digitlab import get_mnist_dataloader, MLP, CNN, summary, train, plot_two_losses
    train_loader, _ = get_mnist_dataloader()
    summary(MLP(), (1, 1, 28, 28))
    loss_list = train(MLP(), train_loader, lr=0.01)

Names are imported on first use, so `import digitlab` (and `digitlab --help`) stays fast.
No module is named after one of these functions, so `digitlab.train`, `digitlab.summary`
and `digitlab.compare` are always the functions.
"""
from importlib import import_module

from digitlab.errors import UserError

_EXPORTS = {
    "get_mnist_dataloader": "data", "load_mnist": "data", "read_idx": "data", "InMemoryLoader": "data",
    "MLP": "models", "CNN": "models", "create_model": "models", "list_models": "models",
    "register_model": "models",
    "summary": "studies.model_summary",
    "TrainConfig": "config", "preset_config": "config",
    "train": "training.loop", "fit": "training.loop", "TrainState": "training.loop",
    "Reporter": "training.reporters",
    "run": "training.run", "resume_config": "training.run_folder",
    "compare": "studies.experiment",
    "plot_loss": "plots", "plot_two_losses": "plots", "plot_sigmoid": "plots", "save_figure": "plots",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
}
__all__ = ["UserError", "__version__", *_EXPORTS]


def __getattr__(name):
    if name == "__version__":  # read from the installed package's metadata when asked, not at import
        globals()[name] = _version()
        return globals()[name]
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'digitlab' has no attribute '{name}'")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("digitlab")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
