"""Evaluation metrics (pure helpers checked by hand) and evaluation of real models."""
from __future__ import annotations

import pytest
import torch

from digitlab.data import InMemoryLoader
from digitlab.errors import UserError
from digitlab.evaluate import confusion_matrix, evaluate, precision_recall, predicted_digits
from digitlab.models import create_model
from digitlab.training.loop import fit
from digitlab.training.optim import make_optimizer


def test_regression_outputs_round_and_clip_to_digits():
    outputs = torch.tensor([[-3.2], [0.49], [0.5], [4.6], [8.51], [12.0]])
    assert predicted_digits(outputs, "regress").tolist() == [0, 0, 0, 5, 9, 9]  # round half to even: 0.5 -> 0


def test_classification_takes_the_arg_max():
    logits = torch.zeros(2, 10)
    logits[0, 7], logits[1, 2] = 3.0, 1.0
    assert predicted_digits(logits, "classify").tolist() == [7, 2]


def test_confusion_precision_recall_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 1, 1])
    confusion = confusion_matrix(labels, preds, num_classes=3)
    assert confusion.tolist() == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    precision, recall = precision_recall(confusion)
    assert precision == pytest.approx([1.0, 0.5, 0.0])  # class 2 never predicted: 0, not NaN
    assert recall == pytest.approx([2 / 3, 1.0, 0.0])


def test_evaluate_a_trained_classifier_on_real_digits(mnist):
    torch.manual_seed(0)
    model = create_model("convnet_small")
    loader = InMemoryLoader(mnist.train_images[:12800], mnist.train_labels[:12800], batch_size=128, seed=0)
    fit(model, loader, make_optimizer("adam", model.parameters(), 0.004), epochs=1, task="classify")
    result = evaluate(model, mnist.test_images[:2000], mnist.test_labels[:2000], task="classify")
    assert 0.93 < result.accuracy <= 1.0
    assert result.accuracy == (result.predictions == mnist.test_labels[:2000].long()).double().mean().item()
    report = result.as_dict()
    assert sum(map(sum, report["confusion"])) == 2000
    assert sum(report["confusion"][i][i] for i in range(10)) == round(result.accuracy * 2000)
    assert all(0.8 < r <= 1.0 for r in report["recall"])
    assert 0 < result.mean_loss < 0.3
    assert model.training  # evaluate puts the model back the way it found it


def test_the_options_name_every_task_and_only_the_tasks():
    """config.TASKS (the --task choices, read without torch) and tasks.TASKS (what each one does) agree."""
    from digitlab.config import TASKS as names
    from digitlab.tasks import TASKS, get_task

    assert tuple(TASKS) == names
    assert [get_task(n).outputs for n in names] == [1, 10]
    with pytest.raises(UserError, match="unknown task 'sort'; choose one of: regress, classify"):
        get_task("sort")
