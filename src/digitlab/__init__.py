"""digitlab: learn and compare neural-network structures on handwritten digits.

The Python API mirrors the course chapter's notebook:

    from digitlab import get_mnist_dataloader, MLP, CNN, summary, train, plot_two_losses
    train_loader, _ = get_mnist_dataloader()
    summary(MLP(), (1, 1, 28, 28))
    loss_list = train(MLP(), train_loader, lr=0.01)

Names are imported on first use, so `import digitlab` (and `digitlab --help`) stays fast.
`summary`, `train` and `compare` are both functions and the modules that hold them; on the
package they always mean the functions (use `from digitlab.train import ...` for the rest).
"""
import sys
import types
from importlib import import_module

from .errors import UserError

_EXPORTS = {
    "get_mnist_dataloader": "data", "load_mnist": "data", "read_idx": "data", "InMemoryLoader": "data",
    "MLP": "models", "CNN": "models", "create_model": "models", "list_models": "models",
    "register_model": "models",
    "summary": "summary",
    "train": "train", "fit": "train", "run": "train", "TrainConfig": "train",
    "compare": "compare",
    "plot_loss": "plots", "plot_two_losses": "plots", "plot_sigmoid": "plots", "save_figure": "plots",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
}
__all__ = ["UserError", *_EXPORTS]


class _Package(types.ModuleType):
    """Python binds a submodule onto its package when the submodule is first imported, which
    would hide the functions `digitlab.summary`, `digitlab.train` and `digitlab.compare`
    behind their modules; this keeps the functions."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'digitlab' has no attribute '{name}'")
