import pytest
import torch
import torch.nn.functional as F

from weakseg.models import labels_to_target, mil_loss


def test_single_label_is_softmax_nll():
    scores = torch.randn(4, 5)
    labels = torch.tensor([0, 3, 1, 4])
    expected = -F.log_softmax(scores, 1)[torch.arange(4), labels].mean()
    assert torch.allclose(mil_loss(scores, labels), expected)


def test_multilabel_softmax_reduces_to_single_label_for_one_tag():
    scores = torch.randn(3, 4)
    labels = torch.tensor([2, 0, 3])
    target = labels_to_target([[2], [0], [3]], 4)
    assert torch.allclose(mil_loss(scores, target), mil_loss(scores, labels))


def test_multilabel_softmax_splits_mass_over_tags():
    scores = torch.tensor([[2.0, 2.0, -5.0]])
    target = labels_to_target([[0, 1]], 3)
    best = mil_loss(scores, target)
    worse = mil_loss(torch.tensor([[4.0, 0.0, -5.0]]), target)
    assert best < worse  # equal evidence for both tags is the optimum


def test_multilabel_bce():
    scores = torch.randn(2, 3)
    target = labels_to_target([[0, 2], [1]], 3)
    assert torch.allclose(mil_loss(scores, target, "bce"), F.binary_cross_entropy_with_logits(scores, target))


def test_bad_targets():
    with pytest.raises(ValueError, match="no label"):
        labels_to_target([[]], 3)
    with pytest.raises(ValueError, match="does not match"):
        mil_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no label"):
        mil_loss(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="softmax' or 'bce"):
        mil_loss(torch.zeros(1, 3), torch.ones(1, 3), "hinge")
