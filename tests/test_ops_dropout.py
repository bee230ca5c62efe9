"""Tests for mdaf_rec.ops.dropout.Dropout (nn.Dropout's behaviour with cheaper masks)."""

import pytest
import torch

from mdaf_rec.ops.dropout import Dropout


def test_drop_rate_scale_and_gradient():
    torch.manual_seed(0)
    drop = Dropout(0.2)
    x = torch.ones(2_000_000, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.2) < 1e-3  # 2e6 draws: std ~3e-4
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 65536 / (65536 - 13107)))  # 1 / keep prob
    assert abs(y.mean().item() - 1.0) < 2e-3  # unbiased
    (g,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(g, y.detach())  # gradient = mask * scale


def test_eval_and_zero_rate_are_identity_and_masks_follow_the_seed():
    x = torch.randn(3, 5, 7)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0)(x) is x
    torch.manual_seed(1)
    a = Dropout(0.5)(x)
    torch.manual_seed(1)
    b = Dropout(0.5)(x)
    assert torch.equal(a, b) and not torch.equal(a, Dropout(0.5)(x))
    # every position of a 64-bit word is used: no position is always kept or always dropped
    torch.manual_seed(2)
    masks = torch.stack([Dropout(0.5)(torch.ones(8)) != 0 for _ in range(200)]).float().mean(0)
    assert ((masks > 0.3) & (masks < 0.7)).all(), masks


def test_rejects_bad_rate():
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)
