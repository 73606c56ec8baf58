"""The summary table must carry the chapter's figures exactly (section 2.4, paddle.summary)."""
from __future__ import annotations

import pytest
from rich.console import Console

from digitlab.models import create_model, list_models
from digitlab.studies.model_summary import describe, summary


def _printed(model) -> tuple[dict, str]:
    console = Console(record=True, width=120)
    result = summary(model, (1, 1, 28, 28), console=console)
    return result, console.export_text()


def test_mlp_matches_the_chapter():
    result, text = _printed(create_model("mlp"))
    assert result == {"total_params": 7971, "trainable_params": 7971}
    s = describe(create_model("mlp"), (1, 1, 28, 28))
    assert [(r.name, r.input_shape, r.output_shape, r.params) for r in s.rows] == [
        ("Linear-1", [[1, 784]], [1, 10], 7850),
        ("Linear-2", [[1, 10]], [1, 10], 110),
        ("Linear-3", [[1, 10]], [1, 1], 11),
    ]
    for line in ("Total params: 7,971", "Trainable params: 7,971", "Non-trainable params: 0",
                 "Input size (MB): 0.00", "Forward/backward pass size (MB): 0.00",
                 "Params size (MB): 0.03", "Estimated Total Size (MB): 0.03"):
        assert line in text.splitlines(), line
    assert "7,850" in text and "[[1, 784]]" in text


def test_cnn_matches_the_chapter():
    result, text = _printed(create_model("cnn"))
    assert result == {"total_params": 11521, "trainable_params": 11521}
    s = describe(create_model("cnn"), (1, 1, 28, 28))
    assert [(r.name, r.input_shape, r.output_shape, r.params) for r in s.rows] == [
        ("Conv2d-1", [[1, 1, 28, 28]], [1, 20, 28, 28], 520),
        ("MaxPool2d-1", [[1, 20, 28, 28]], [1, 20, 14, 14], 0),
        ("Conv2d-2", [[1, 20, 14, 14]], [1, 20, 14, 14], 10020),
        ("MaxPool2d-2", [[1, 20, 14, 14]], [1, 20, 7, 7], 0),
        ("Linear-1", [[1, 980]], [1, 1], 981),
    ]
    for line in ("Total params: 11,521", "Trainable params: 11,521", "Non-trainable params: 0",
                 "Input size (MB): 0.00", "Forward/backward pass size (MB): 0.19",
                 "Params size (MB): 0.04", "Estimated Total Size (MB): 0.23"):
        assert line in text.splitlines(), line


@pytest.mark.parametrize("name", list_models())
def test_every_model_summary_counts_its_parameters(name):
    model = create_model(name, num_outputs=10)
    s = describe(model, (1, 1, 28, 28))
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert sum(r.params for r in s.rows) == s.total_params  # every parameter sits in some listed layer
    assert s.rows[-1].output_shape == [1, 10]


def test_frozen_parameters_count_as_non_trainable():
    model = create_model("cnn")
    model.conv1.requires_grad_(False)
    s = describe(model, (1, 1, 28, 28))
    assert (s.total_params, s.trainable_params, s.non_trainable_params) == (11521, 11001, 520)
