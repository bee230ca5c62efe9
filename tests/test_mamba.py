"""Tests for mdaf_rec.models.mamba: MambaBlock and the Mamba4Rec encoder (the scan: test_scan_ops.py)."""

import pytest
import torch
import torch.nn.functional as F

from mdaf_rec.models.mamba import Mamba4RecEncoder, Mamba4RecLayer, MambaBlock
from mdaf_rec.ops import scan_cpu, selective_scan


pytestmark = pytest.mark.usefixtures("one_thread")  # the kernels' results must not depend on the threads


# ----------------------------------------------------------------------------- MambaBlock

# mamba_ssm.Mamba(d_model=128) (d_state=16, d_conv=4, expand=2 -> d_inner=256, dt_rank=8)
MAMBA_SSM_128_STATE_DICT = {
    "A_log": (256, 16),
    "D": (256,),
    "in_proj.weight": (512, 128),
    "conv1d.weight": (256, 1, 4),
    "conv1d.bias": (256,),
    "x_proj.weight": (40, 256),
    "dt_proj.weight": (256, 8),
    "dt_proj.bias": (256,),
    "out_proj.weight": (128, 256),
}


def test_mamba_block_state_dict_matches_mamba_ssm():
    block = MambaBlock(128)
    sd = block.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == MAMBA_SSM_128_STATE_DICT
    assert list(sd) == list(MAMBA_SSM_128_STATE_DICT)  # same order as mamba_ssm's
    other = MambaBlock(128)
    other.load_state_dict(sd, strict=True)
    x = torch.randn(2, 5, 128)
    torch.testing.assert_close(other(x), block(x), rtol=0, atol=0)


def test_mamba_block_init():
    torch.manual_seed(0)
    block = MambaBlock(128, dt_min=0.001, dt_max=0.1)
    dt = F.softplus(block.dt_proj.bias.detach())
    assert dt.min().item() >= 0.001 * (1 - 1e-5) and dt.max().item() <= 0.1 * (1 + 1e-5)
    assert dt.max().item() / dt.min().item() > 10  # spread over the log-uniform range
    bound = block.dt_rank**-0.5
    assert block.dt_proj.weight.abs().max().item() <= bound
    A = -torch.exp(block.A_log.detach())
    torch.testing.assert_close(A, -torch.arange(1.0, 17.0).repeat(256, 1))
    torch.testing.assert_close(block.D.detach(), torch.ones(256))
    assert block.in_proj.bias is None and block.out_proj.bias is None
    assert block.conv1d.groups == 256 and block.conv1d.bias is not None
    const = MambaBlock(32, dt_init="constant", dt_min=0.01, dt_max=0.02)
    assert torch.all(const.dt_proj.weight == const.dt_rank**-0.5)
    dt = F.softplus(const.dt_proj.bias.detach())
    assert dt.min().item() >= 0.01 * (1 - 1e-5) and dt.max().item() <= 0.02 * (1 + 1e-5)


def test_mamba_block_shape_and_causality():
    torch.manual_seed(0)
    block = MambaBlock(32, d_state=8)
    x = torch.randn(3, 12, 32)
    out = block(x)
    assert out.shape == (3, 12, 32)
    for t in (0, 4, 10):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
        out2 = block(x2)
        torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out2[:, t + 1 :], out[:, t + 1 :])


@pytest.mark.parametrize("backend", ["torch_cpu", "torch_gpu", "cpp"])
def test_mamba_block_same_with_every_scan_backend(monkeypatch, backend):
    """The block's output and gradients do not depend on the scan implementation."""
    if backend == "cpp" and not scan_cpu.available():
        pytest.skip("compiled CPU selective scan unavailable")
    torch.manual_seed(0)
    block = MambaBlock(16, d_state=4).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    monkeypatch.setattr(selective_scan, "scan_backend", lambda u: "reference")
    out = block(x)
    grads = torch.autograd.grad(out.sum(), list(block.parameters()))
    monkeypatch.setattr(selective_scan, "scan_backend", lambda u: backend)
    out_b = block(x)
    torch.testing.assert_close(out_b, out, rtol=0, atol=1e-12)
    for g_b, g in zip(torch.autograd.grad(out_b.sum(), list(block.parameters())), grads):
        torch.testing.assert_close(g_b, g, rtol=0, atol=1e-10)


def test_mamba_block_positions_compute_the_rows_read():
    """With positions the block returns exactly the full output's rows there, and the gradient
    of everything after a row's position is zero."""
    torch.manual_seed(0)
    block = MambaBlock(16, d_state=4).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([8, 0, 4])
    out = block(x, positions)
    assert out.shape == (3, 16)
    torch.testing.assert_close(out, block(x)[torch.arange(3), positions], rtol=0, atol=1e-12)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    assert gx[1, 1:].abs().max() == 0 and gx[2, 5:].abs().max() == 0 and gx[0, 8].abs().max() > 0


def test_mamba_block_backward_reaches_all_parameters():
    torch.manual_seed(0)
    block = MambaBlock(16, d_state=4)
    block(torch.randn(2, 7, 16)).pow(2).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------- Mamba4Rec encoder


def test_encoder_shape_and_structure():
    torch.manual_seed(0)
    enc = Mamba4RecEncoder()
    out = enc(torch.randn(4, 10, 128), torch.tensor([1, 4, 10, 7]))
    assert out.shape == (4, 128)
    assert len(enc.mamba_layers) == 2 and all(layer.residual for layer in enc.mamba_layers)
    assert not Mamba4RecEncoder(d_model=16, num_layers=1).mamba_layers[0].residual
    layer = Mamba4RecLayer(16, 4, 4, 2, 0.1)
    assert layer.ffn.w_1.out_features == 64 and layer.LayerNorm.eps == 1e-12


def test_encoder_output_is_last_valid_position():
    torch.manual_seed(0)
    enc = Mamba4RecEncoder(d_model=16, num_layers=2, d_state=4).eval()
    tokens = torch.randn(3, 6, 16)
    lengths = torch.tensor([2, 6, 4])
    hidden = enc.LayerNorm(tokens)
    for layer in enc.mamba_layers:
        hidden = layer(hidden)
    expected = hidden[torch.arange(3), lengths - 1]
    # The encoder runs the last layer's feed-forward on the gathered rows only: same maths, other
    # matmul shapes, so equal to float32 rounding.
    torch.testing.assert_close(enc(tokens, lengths), expected, rtol=0, atol=1e-6)


def test_encoder_padding_invariance():
    torch.manual_seed(0)
    enc = Mamba4RecEncoder().eval()
    lengths = torch.tensor([1, 3, 7, 10, 5])
    valid = torch.randn(5, 10, 128)
    mask = torch.arange(10)[None, :, None] < lengths[:, None, None]
    zero_padded = valid * mask  # right padding of zeros, L = 10
    garbage = torch.randn(5, 16, 128) * 5  # longer padding (L = 16) with arbitrary content
    garbage[:, :10][mask.expand(-1, -1, 128)] = valid[mask.expand(-1, -1, 128)]
    with torch.no_grad():
        out_a = enc(zero_padded, lengths)
        out_b = enc(garbage, lengths)
        out_c = torch.cat(  # each sequence alone, unpadded
            [enc(valid[i : i + 1, : int(n)], lengths[i : i + 1]) for i, n in enumerate(lengths)]
        )
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_a, out_c, rtol=0, atol=1e-6)


def test_encoder_every_parameter_gets_gradient():
    torch.manual_seed(0)
    enc = Mamba4RecEncoder(d_model=128, num_layers=2)
    enc.train()
    tokens = torch.randn(4, 8, 128, requires_grad=True)
    out = enc(tokens, torch.tensor([8, 3, 1, 6]))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert tokens.grad[1, 3:].abs().sum() == 0  # padding gets no gradient


@pytest.mark.parametrize("lengths", [torch.tensor([3]), torch.tensor([[3, 4]]), torch.tensor([3.0, 4.0])])
def test_encoder_rejects_lengths_of_the_wrong_shape_or_dtype(lengths):
    """Shape and dtype are checked here; values where data enters (no host sync in the forward)."""
    enc = Mamba4RecEncoder(d_model=16, d_state=4)
    with pytest.raises(ValueError, match="lengths"):
        enc(torch.randn(2, 8, 16), lengths)


def test_encoder_read_position_out_of_range_is_an_error_not_garbage():
    enc = Mamba4RecEncoder(d_model=16, d_state=4)
    with pytest.raises((RuntimeError, IndexError), match="index|position"):
        enc(torch.randn(2, 8, 16), torch.tensor([3, 9]))
