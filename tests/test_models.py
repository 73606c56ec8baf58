"""The registry, and one set of checks generated for every registered model."""
from __future__ import annotations

import math

import pytest
import torch

from digitlab.errors import UserError
from digitlab.models import CNN, MLP, MaxPool2d, create_model, list_models


def test_registry_lists_the_chapter_models():
    assert {"mlp", "cnn"} <= set(list_models())
    assert isinstance(create_model("mlp"), MLP) and isinstance(create_model("cnn"), CNN)


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(UserError) as err:
        create_model("resnet9000")
    assert str(err.value) == f"unknown model 'resnet9000'; choose one of: {', '.join(list_models())}"


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_outputs", [1, 10])
def test_every_model_shapes_and_gradients(name, num_outputs):
    torch.manual_seed(0)
    model = create_model(name, num_outputs=num_outputs)
    x = torch.randn(5, 1, 28, 28)
    model.eval()  # dropout off, so that two passes agree
    assert model.forward_head(model.forward_features(x)).equal(model(x))
    model.train()
    out = model(x)
    assert out.shape == (5, num_outputs)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"


@pytest.mark.parametrize("name", list_models())
def test_output_width_is_one_argument(name):
    one = sum(p.numel() for p in create_model(name, num_outputs=1).parameters())
    ten = sum(p.numel() for p in create_model(name, num_outputs=10).parameters())
    head_in = create_model(name).forward_features(torch.zeros(1, 1, 28, 28)).shape[1]
    assert ten - one == 9 * (head_in + 1)  # nine more output units, each with weights and a bias


def test_paddle_initialisation():
    torch.manual_seed(0)
    model = create_model("cnn")
    for module in (model.conv1, model.conv2, model.fc):
        assert module.bias.abs().sum() == 0
    fan_in = 20 * 5 * 5
    assert model.conv2.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    limit = math.sqrt(6 / (980 + 1))  # Xavier-uniform bound for the 980 -> 1 layer
    assert model.fc.weight.abs().max().item() <= limit
    assert model.fc.weight.abs().max().item() > 0.9 * limit
    torch_init = create_model("cnn", init="torch")
    assert torch_init.conv1.bias.abs().sum() > 0
    with pytest.raises(UserError, match="unknown init 'xavier'"):
        create_model("cnn", init="xavier")


@pytest.mark.parametrize("shape", [(3, 20, 28, 28), (2, 4, 7, 7), (1, 1, 5, 6)])
def test_inference_max_pool_equals_torch(shape):
    x = torch.randn(shape)
    x[0, 0, :2, :2] = 1.0  # a tie
    pool = MaxPool2d(2).eval()
    reference = torch.nn.functional.max_pool2d(x, 2)
    with torch.inference_mode():
        assert torch.equal(pool(x), reference)
        assert torch.equal(MaxPool2d(2, 2).eval()(x.contiguous(memory_format=torch.channels_last)), reference)
    assert torch.equal(pool(x), reference)  # grad mode on: the same path, the same values

    def ops(module) -> list[str]:
        graph = torch.export.export(module, (x,)).graph
        return sorted(str(n.target) for n in graph.nodes if n.op == "call_function")

    with_grad = ops(pool)
    with torch.no_grad():
        without = ops(pool)
    assert with_grad == without and not any("max_pool" in op for op in with_grad)  # the graph ignores autograd
    assert any("max_pool" in op for op in ops(MaxPool2d(2)))  # training mode: nn.MaxPool2d itself


def test_package_names_are_the_notebook_functions():
    import subprocess
    import sys

    code = ("import digitlab; digitlab.compare; from digitlab.config import TrainConfig; "
            "from digitlab import summary, train; "
            "import digitlab.studies.model_summary, digitlab.training.loop, digitlab.training.run, "
            "digitlab.studies.experiment; "
            "print(callable(digitlab.summary), callable(digitlab.train), callable(digitlab.compare), "
            "summary is digitlab.summary, digitlab.summary(digitlab.MLP(), (1, 1, 28, 28))['total_params'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True True True True 7971"
