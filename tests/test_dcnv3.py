import math

import pytest
import torch
import torch.nn.functional as F

from mdaf_rec.models.dcnv3 import (
    DCNv3,
    DCNv3Output,
    ExponentialCrossNetwork,
    LinearCrossNetwork,
    MultiHeadFeatureEmbedding,
    tri_bce_loss,
)


def _bce(logits, labels):
    """Mean BCE on sigmoid probabilities, by hand (as the reference code computes it)."""
    total = 0.0
    for z, y in zip(logits, labels):
        p = 1.0 / (1.0 + math.exp(-z))
        total -= y * math.log(p) + (1 - y) * math.log(1 - p)
    return total / len(logits)


@pytest.mark.parametrize(
    "num_fields,field_dim,num_heads",
    [(3, 16, 1), (5, 8, 2), (4, 12, 3), (2, 6, 2), (2, 4, 4)],
)
def test_shapes(num_fields, field_dim, num_heads):
    torch.manual_seed(0)
    model = DCNv3(num_fields, field_dim=field_dim, num_heads=num_heads, output_dim=128)
    x = torch.randn(7, num_fields, field_dim)
    out = model(x)
    assert isinstance(out, DCNv3Output)
    for logit in (out.logit, out.lcn_logit, out.ecn_logit):
        assert logit.shape == (7,)
    assert out.embedding is None
    torch.testing.assert_close(out.logit, (out.lcn_logit + out.ecn_logit) / 2)

    out = model(x, return_embedding=True)
    assert out.embedding.shape == (7, 128)

    heads = MultiHeadFeatureEmbedding(num_heads)(x)
    assert heads.shape == (7, num_heads, num_fields * field_dim // num_heads)


def test_embedding_projection_only_runs_when_asked():
    model = DCNv3(3, field_dim=8)
    calls = []
    model.embedding_proj.register_forward_hook(lambda *args: calls.append(1))
    model(torch.randn(2, 3, 8))
    assert calls == []
    model(torch.randn(2, 3, 8), return_embedding=True)
    assert calls == [1]


def test_multi_head_split_matches_hand_example():
    # B=1, F=2, D=4: field 0 = [0, 1, 2, 3], field 1 = [10, 11, 12, 13].
    x = torch.tensor([[[0.0, 1, 2, 3], [10, 11, 12, 13]]])
    # H=2: head h takes chunk h of every field; inside a head, first halves then second halves.
    expected_h2 = torch.tensor([[[0.0, 10, 1, 11], [2, 12, 3, 13]]])
    torch.testing.assert_close(MultiHeadFeatureEmbedding(2)(x), expected_h2, rtol=0, atol=0)
    # H=1: [first half of f0, first half of f1, second half of f0, second half of f1].
    expected_h1 = torch.tensor([[[0.0, 1, 10, 11, 2, 3, 12, 13]]])
    torch.testing.assert_close(MultiHeadFeatureEmbedding(1)(x), expected_h1, rtol=0, atol=0)
    # Odd per-head width (D/H = 3): tensor_split gives the first half the extra element.
    x = torch.arange(12.0).view(1, 2, 6)  # f0 = 0..5, f1 = 6..11
    expected = torch.tensor([[[0.0, 1, 6, 7, 2, 8], [3, 4, 9, 10, 5, 11]]])
    torch.testing.assert_close(MultiHeadFeatureEmbedding(2)(x), expected, rtol=0, atol=0)


def test_multi_head_rejects_indivisible_width():
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadFeatureEmbedding(3)(torch.randn(2, 2, 8))
    with pytest.raises(ValueError, match="num_heads"):
        DCNv3(2, field_dim=8, num_heads=3)


def test_cross_network_recurrences():
    """LCN crosses with x_0, ECN with x_l (checked against a hand-written single-head pass)."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6)
    for cls, uses_x0 in ((LinearCrossNetwork, True), (ExponentialCrossNetwork, False)):
        net = cls(6, num_layers=2, net_dropout=0.0, num_heads=1).eval()
        h_state = x
        for layer in net.layers:
            h = layer.weight(h_state)
            mask = torch.relu(F.layer_norm(h, (3,), layer.layer_norm.weight, layer.layer_norm.bias))
            crossed = torch.cat([h, h * mask], dim=-1)
            h_state = (x if uses_x0 else h_state) * (crossed + layer.bias) + h_state
        logit, hidden = net(x)
        torch.testing.assert_close(hidden, h_state)
        torch.testing.assert_close(logit, net.fc(h_state).mean(dim=1).squeeze(-1))


@pytest.mark.parametrize("num_heads,batch_norm", [(1, False), (2, True)])
def test_every_parameter_gets_gradient(num_heads, batch_norm):
    torch.manual_seed(0)
    model = DCNv3(4, field_dim=8, num_heads=num_heads, batch_norm=batch_norm).train()
    x = torch.randn(32, 4, 8)
    labels = torch.randint(0, 2, (32,)).float()
    out = model(x, return_embedding=True)
    loss = tri_bce_loss(out.logit, out.lcn_logit, out.ecn_logit, labels) + out.embedding.sum()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_tri_bce_matches_hand_computation():
    labels = [1.0, 0.0, 1.0, 0.0]
    main = [0.5, -0.3, 0.2, -0.1]
    lcn = [2.0, -2.5, 1.5, -1.0]  # better than main -> weight 0
    ecn = [-0.4, 0.6, 0.1, 0.3]  # worse than main -> positive weight
    loss_main, loss_lcn, loss_ecn = _bce(main, labels), _bce(lcn, labels), _bce(ecn, labels)
    assert loss_lcn < loss_main < loss_ecn
    expected = loss_main + max(0.0, loss_lcn - loss_main) * loss_lcn
    expected += max(0.0, loss_ecn - loss_main) * loss_ecn
    got = tri_bce_loss(*(torch.tensor(v, dtype=torch.float64) for v in (main, lcn, ecn, labels)))
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_tri_bce_weights_are_not_detached():
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    main = torch.tensor([0.5, -0.3, 0.2, -0.1], dtype=torch.float64, requires_grad=True)
    lcn = torch.tensor([2.0, -2.5, 1.5, -1.0], dtype=torch.float64, requires_grad=True)
    ecn = torch.tensor([-0.4, 0.6, 0.1, 0.3], dtype=torch.float64, requires_grad=True)

    grads = torch.autograd.grad(tri_bce_loss(main, lcn, ecn, labels), (main, lcn, ecn))

    def detached_version():
        l_main = F.binary_cross_entropy_with_logits(main, labels)
        l_lcn = F.binary_cross_entropy_with_logits(lcn, labels)
        l_ecn = F.binary_cross_entropy_with_logits(ecn, labels)
        w_lcn = torch.relu(l_lcn - l_main).detach()
        w_ecn = torch.relu(l_ecn - l_main).detach()
        return l_main + w_lcn * l_lcn + w_ecn * l_ecn

    detached_grads = torch.autograd.grad(detached_version(), (main, lcn, ecn))
    assert not torch.allclose(grads[0], detached_grads[0])
    assert not torch.allclose(grads[2], detached_grads[2])

    # Analytic gradients with the weights differentiated: w_lcn = 0 (and stays 0 locally),
    # w_ecn = L_ecn - L_main, so L = L_main + (L_ecn - L_main) * L_ecn.
    with torch.no_grad():
        l_main = F.binary_cross_entropy_with_logits(main, labels)
        l_ecn = F.binary_cross_entropy_with_logits(ecn, labels)
        d_main = (torch.sigmoid(main) - labels) / 4  # d L_main / d main
        d_ecn = (torch.sigmoid(ecn) - labels) / 4  # d L_ecn / d ecn
    torch.testing.assert_close(grads[0], (1 - l_ecn) * d_main)
    torch.testing.assert_close(grads[1], torch.zeros_like(lcn))
    torch.testing.assert_close(grads[2], (2 * l_ecn - l_main) * d_ecn)


def test_overfits_tiny_separable_problem():
    torch.manual_seed(0)
    x = 0.1 * torch.randn(128, 4, 8)  # embedding-table scale; ECN grows fast on large inputs
    labels = (x.flatten(1) @ torch.randn(32) > 0).float()
    model = DCNv3(4, field_dim=8, num_heads=2, deep_net_dropout=0.0, shallow_net_dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        out = model(x)
        loss = tri_bce_loss(out.logit, out.lcn_logit, out.ecn_logit, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    model.eval()
    accuracy = ((model(x).logit > 0).float() == labels).float().mean()
    assert accuracy > 0.95
