"""Per-tile prediction measures, known answers: the target choice, the predicted class, classification
logits from any head, and the prediction-difference columns saliency and evaluate write."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smoothsal.errors import BadOption
from smoothsal.predictions import (
    check_task,
    choose_targets,
    class_logits,
    predicted_class,
    prediction_columns,
)


def test_targets_are_labels_where_labelled_else_the_originals_prediction():
    original = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
    labels = torch.tensor([1, -1, 0])
    assert choose_targets(original, labels, "label").tolist() == [1, 1, 0]
    assert choose_targets(original, labels, "predicted").tolist() == [0, 1, 2]
    assert choose_targets(torch.tensor([[-3.0], [2.0]]), torch.tensor([-1, 1]), "label").tolist() == [0, 0]
    # segmentation: the tile's majority class; unannotated (−1): the predicted majority foreground class
    seg = torch.zeros(2, 3, 2, 2)
    seg[:, 2, 0, :] = 5.0  # class 2 on the top row of both tiles, background elsewhere
    majority = torch.tensor([1, -1])
    assert choose_targets(seg, labels[:2], "label", task="segmentation", majority=majority).tolist() == [1, 2]
    with pytest.raises(BadOption, match="unknown target 'best'; allowed: label, predicted"):
        choose_targets(original, labels, "best")


def test_predicted_class_and_logits_of_any_classification_head():
    assert predicted_class(torch.tensor([[0.5], [-0.1]])).tolist() == [1, 0]  # one logit: positive above 0
    assert predicted_class(torch.tensor([[0.1, 0.9], [2.0, -1.0]])).tolist() == [1, 0]
    conv_head = torch.arange(6.0).view(2, 3, 1, 1)  # the MONAI bundle: [B, K, 1, 1]
    assert torch.equal(class_logits(conv_head), torch.arange(6.0).view(2, 3))
    with pytest.raises(BadOption, match=r"\(2, 3, 8, 8\), not classification logits.*--task segmentation"):
        class_logits(torch.zeros(2, 3, 8, 8))
    check_task("segmentation", (1, 3, 8, 8), "unet_resnet34")
    with pytest.raises(BadOption, match="a segmentation model; pass --task segmentation"):
        check_task("classification", (1, 3, 8, 8), "unet_resnet34")
    with pytest.raises(BadOption, match="pass --task classification"):
        check_task("segmentation", (1, 3, 1, 1), "monai_fc_resnet18")


def test_classification_columns_by_hand():
    original = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    out = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    labels, target = torch.tensor([0, -1]), torch.tensor([0, 1])
    cols = prediction_columns("classification", original, out, labels, target)
    p = 1 / (1 + math.exp(-2))  # softmax of [2, 0]: 0.881 for class 0
    assert cols["pd_all"] == pytest.approx([2 * (p - 0.5), 0.0]) and cols["pd_target"] == pytest.approx(
        [p - 0.5, 0.0]
    )
    assert cols["pred"].tolist() == [0, 1]  # a tie goes to the first class
    assert cols["correct"][0] == 1.0 and math.isnan(cols["correct"][1])  # unlabelled: no verdict
    np.testing.assert_allclose(cols["prob_0"], [0.5, 1 - 1 / (1 + math.exp(-1))], rtol=1e-6)
    assert cols["logit_1"].tolist() == [1.0, 1.0] and np.isnan(cols["pd_masked"]).all()


def test_agreement_is_one_where_the_method_predicts_the_originals_class():
    original = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    out = torch.tensor([[0.0, 3.0], [0.0, 1.0], [5.0, 1.0]])  # flips tile 0 and 2, keeps tile 1
    cols = prediction_columns(
        "classification", original, out, torch.tensor([-1, -1, -1]), torch.tensor([0, 1, 1])
    )
    assert cols["agree"].tolist() == [0.0, 1.0, 0.0]
    same = prediction_columns(
        "classification", original, original, torch.tensor([-1] * 3), torch.tensor([0, 1, 1])
    )
    assert same["agree"].tolist() == [1.0, 1.0, 1.0]


def test_segmentation_columns_are_per_pixel_means_and_the_masked_difference():
    original = torch.zeros(1, 2, 1, 2)
    original[0, 0, 0, 0] = 4.0  # pixel 0 confidently background
    original[0, 1, 0, 1] = 4.0  # pixel 1 confidently class 1
    out = original.clone()
    out[0, 1, 0, 1] = 0.0  # the smoothed model loses it
    cols = prediction_columns(
        "segmentation", original, out, torch.tensor([-1]), torch.tensor([1]), torch.tensor([1])
    )
    sig = 1 / (1 + math.exp(-4))  # softmax of [0, 4] for class 1
    assert cols["pd_all"] == pytest.approx([(0 + 2 * (sig - 0.5)) / 2])  # mean over the two pixels
    assert cols["pd_target"] == pytest.approx([(sig - 0.5) / 2])
    assert cols["pd_masked"] == pytest.approx([2 * (sig - 0.5)])  # only the pixel the original is sure of
    assert (
        cols["prob_1"] == pytest.approx([(1 - sig + 0.5) / 2])
        and cols["pred"].tolist() == [0]
        and np.isnan(cols["correct"][0])
    )
