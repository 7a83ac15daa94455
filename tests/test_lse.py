import math

import pytest
import torch

from weakseg.models import LSEPool, lse_pool


def test_large_r_approaches_max_small_r_approaches_mean():
    scores = torch.randn(3, 5, 7, 9)
    flat = scores.flatten(2)
    assert torch.allclose(lse_pool(scores, r=1e4), flat.amax(-1), atol=1e-2)
    assert torch.allclose(lse_pool(scores, r=1e-4), flat.mean(-1), atol=1e-3)


def test_between_mean_and_max_and_increasing_in_r():
    scores = torch.randn(2, 4, 6, 6)
    low, mid, high = (lse_pool(scores, r) for r in (0.5, 5, 50))
    flat = scores.flatten(2)
    assert (flat.mean(-1) <= low + 1e-6).all()
    assert (low <= mid + 1e-6).all() and (mid <= high + 1e-6).all()
    assert (high <= flat.amax(-1) + 1e-6).all()


def test_matches_the_formula():
    scores = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    r = 5.0
    expected = torch.log(torch.exp(r * scores).mean(dim=(2, 3))) / r
    assert torch.allclose(lse_pool(scores, r), expected)


def test_finite_at_r50_with_scores_near_100():
    scores = 100 + torch.randn(2, 3, 8, 8)
    out = lse_pool(scores, r=50)
    assert torch.isfinite(out).all()
    assert (out <= scores.flatten(2).amax(-1) + 1e-4).all()
    x = scores.clone().requires_grad_(True)
    lse_pool(x, r=50).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_mask_excludes_padding():
    scores = torch.randn(1, 2, 6, 8)
    mask = torch.zeros(1, 6, 8, dtype=torch.bool)
    mask[:, :4, :5] = True
    padded = scores.clone()
    padded[..., 4:, :] = 1e3  # padding holds garbage that must not count
    padded[..., :, 5:] = 1e3
    expected = lse_pool(scores[..., :4, :5], r=5)
    assert torch.allclose(lse_pool(padded, r=5, mask=mask), expected, atol=1e-5)
    # h*w counts only valid cells: a constant map scores that constant whatever the padding.
    const = torch.full((1, 1, 6, 8), 2.0)
    assert torch.allclose(lse_pool(const, r=5, mask=mask), torch.tensor([[2.0]]))


def test_batched_mask_scores_each_image_as_alone():
    a, b = torch.randn(1, 3, 5, 5), torch.randn(1, 3, 3, 4)
    batch = torch.zeros(2, 3, 5, 5)
    batch[0], batch[1, :, :3, :4] = a[0], b[0]
    mask = torch.zeros(2, 5, 5, dtype=torch.bool)
    mask[0] = True
    mask[1, :3, :4] = True
    out = lse_pool(batch, 5, mask)
    assert torch.allclose(out[0], lse_pool(a, 5)[0], atol=1e-6)
    assert torch.allclose(out[1], lse_pool(b, 5)[0], atol=1e-6)


def test_gradients_concentrate_on_highest_scores():
    scores = torch.zeros(1, 1, 5, 5)
    scores[0, 0, 2, 3] = 3.0
    scores[0, 0, 0, 0] = 2.0
    x = scores.clone().requires_grad_(True)
    lse_pool(x, r=5).sum().backward()
    grad = x.grad[0, 0]
    assert torch.isclose(grad.sum(), torch.tensor(1.0))  # softmax weights over locations
    assert grad.argmax() == 2 * 5 + 3
    assert grad[2, 3] > 0.9
    assert grad[2, 3] > grad[0, 0] > grad[4, 4]
    # small r spreads the gradient evenly (average pooling)
    y = scores.clone().requires_grad_(True)
    lse_pool(y, r=1e-3).sum().backward()
    assert torch.allclose(y.grad, torch.full_like(y.grad, 1 / 25), atol=1e-3)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="r must be > 0"):
        lse_pool(torch.zeros(1, 1, 2, 2), r=0)
    with pytest.raises(ValueError, match=r"\[B, K, h, w\]"):
        lse_pool(torch.zeros(2, 2), r=1)
    with pytest.raises(ValueError, match="no valid location"):
        lse_pool(torch.zeros(1, 1, 2, 2), r=1, mask=torch.zeros(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match"):
        lse_pool(torch.zeros(1, 1, 2, 2), r=1, mask=torch.ones(1, 3, 3, dtype=torch.bool))


def test_module_form():
    pool = LSEPool(r=5)
    scores = torch.randn(2, 3, 4, 4)
    assert torch.equal(pool(scores), lse_pool(scores, 5))
    assert "r=5.0" in repr(pool)
    assert math.isclose(pool.r, 5.0)
