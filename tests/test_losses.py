import pytest
import torch
import torch.nn.functional as F

from weakseg.models import image_prior_for, image_probabilities, labels_to_target, mil_loss


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


def test_softmax_plus_bce_adds_a_presence_term_summed_over_classes():
    scores = torch.randn(2, 3)
    target = labels_to_target([[0, 2], [1]], 3)
    bce = F.binary_cross_entropy_with_logits(scores, target, reduction="none").sum(1).mean()
    assert torch.allclose(mil_loss(scores, target, "softmax+bce"), mil_loss(scores, target, "softmax") + bce)
    # the softmax share of each tag stays the same when every score moves together; the
    # presence term does not: it pushes both tags up and the absent class down
    up = scores + torch.tensor([[5.0, -5.0, 5.0], [-5.0, 5.0, -5.0]])
    assert mil_loss(up, target, "softmax+bce") < mil_loss(scores, target, "softmax+bce")


def test_image_prior_follows_the_loss():
    assert image_prior_for(multilabel=False, loss="softmax+bce") == "softmax"  # single label: the paper
    assert image_prior_for(multilabel=True, loss="softmax") == "softmax"
    assert image_prior_for(multilabel=True, loss="softmax+bce") == "sigmoid"
    assert image_prior_for(multilabel=True, loss="bce") == "sigmoid"
    s = torch.tensor([[2.0, 0.0, -2.0]])
    assert torch.allclose(image_probabilities(s, "softmax").sum(), torch.tensor(1.0))
    assert torch.allclose(image_probabilities(s, "sigmoid"), torch.sigmoid(s))
    with pytest.raises(ValueError, match="image prior"):
        image_probabilities(s, "max")


def test_bad_targets():
    with pytest.raises(ValueError, match="no label"):
        labels_to_target([[]], 3)
    with pytest.raises(ValueError, match="does not match"):
        mil_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no label"):
        mil_loss(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="'softmax', 'bce', 'softmax\\+bce'"):
        mil_loss(torch.zeros(1, 3), torch.ones(1, 3), "hinge")
