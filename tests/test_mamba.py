"""Tests for mdaf_rec.models.mamba: selective scan, MambaBlock, Mamba4Rec encoder."""

import math

import pytest
import torch
import torch.nn.functional as F

from mdaf_rec.models import mamba as mamba_mod
from mdaf_rec.models.mamba import (
    Mamba4RecEncoder,
    Mamba4RecLayer,
    MambaBlock,
    selective_scan,
    selective_scan_reference,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def close(a, b, dtype):
    """Max abs error <= TOL; for float32 relative to the magnitude when that exceeds 1
    (e.g. dL/dA sums batch x length terms of size ~1, so it reaches ~40 here)."""
    scale = 1.0 if dtype == torch.float64 else max(1.0, b.abs().max().item())
    return max_err(a, b) <= TOL[dtype] * scale


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_scan_inputs(
    bc: str,
    dtype: torch.dtype,
    with_d: bool = True,
    with_z: bool = True,
    with_bias: bool = True,
    batch: int = 3,
    dim: int = 6,
    length: int = 11,
    d_state: int = 4,
    seed: int = 0,
):
    """Random scan inputs; ``bc`` is "const" (dim, N), "var" (B, N, L) or "grouped" (B, G, N, L)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if bc == "const":
        bshape = (dim, d_state)
    elif bc == "var":
        bshape = (batch, d_state, length)
    else:
        bshape = (batch, 2, d_state, length)
    x = {
        "u": rnd(batch, dim, length),
        # positive step sizes, as in Mamba (also without softplus): a stable, decaying scan
        "delta": rnd(batch, dim, length, scale=0.5).abs(),
        "A": -torch.rand(dim, d_state, generator=g, dtype=torch.float64).mul(2).add(0.1).to(dtype),
        "B": rnd(*bshape),
        "C": rnd(*bshape),
        "D": rnd(dim) if with_d else None,
        "z": rnd(batch, dim, length) if with_z else None,
        "delta_bias": rnd(dim, scale=0.2).abs() if with_bias else None,
    }
    for t in x.values():
        if t is not None:
            t.requires_grad_()
    return x


def grads(y, x, gy):
    names = [k for k, v in x.items() if v is not None]
    gs = torch.autograd.grad(y, [x[k] for k in names], gy)
    return dict(zip(names, gs))


def max_err(a, b):
    return (a - b).abs().max().item()


OPTIONS = [  # (with_d, with_z, with_bias, delta_softplus)
    (True, True, True, True),
    (False, False, False, False),
    (True, False, False, True),
    (False, True, True, False),
    (False, False, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bc", ["var", "const", "grouped"])
@pytest.mark.parametrize("options", OPTIONS)
def test_selective_scan_matches_reference(dtype, bc, options):
    with_d, with_z, with_bias, softplus = options
    x = make_scan_inputs(bc, dtype, with_d, with_z, with_bias)
    y, last = selective_scan(**x, delta_softplus=softplus, return_last_state=True)
    y_ref, last_ref = selective_scan_reference(**x, delta_softplus=softplus, return_last_state=True)
    assert y.shape == y_ref.shape == x["u"].shape and y.dtype == dtype
    assert last.shape == (3, 6, 4)
    assert close(y, y_ref, dtype)
    assert close(last, last_ref, dtype)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    g, g_ref = grads(y, x, gy), grads(y_ref, x, gy)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert g[name].shape == x[name].shape, name
        assert close(g[name], g_ref[name], dtype), name


@pytest.mark.parametrize("bc", ["var", "const"])
@pytest.mark.parametrize("block_b,block_l", [(1, 1), (2, 3), (2, 4), (5, 11), (1, 100)])
def test_selective_scan_blocking_is_exact(bc, block_b, block_l):
    """Any batch/time blocking (incl. state carried across time chunks) gives the same result."""
    x = make_scan_inputs(bc, torch.float64)
    y, last = selective_scan(
        **x, delta_softplus=True, return_last_state=True, block_b=block_b, block_l=block_l
    )
    y_ref, last_ref = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    assert max_err(y, y_ref) <= 1e-10 and max_err(last, last_ref) <= 1e-10
    gy = torch.randn(y.shape, dtype=torch.float64)
    g, g_ref = grads(y, x, gy), grads(y_ref, x, gy)
    for name in g:
        assert max_err(g[name], g_ref[name]) <= 1e-10, name


def test_selective_scan_default_return_and_no_grad():
    x = make_scan_inputs("var", torch.float32)
    with torch.no_grad():
        y = selective_scan(**x, delta_softplus=True)
    assert isinstance(y, torch.Tensor) and not y.requires_grad
    assert max_err(y, selective_scan_reference(**x, delta_softplus=True)) <= 1e-5


def test_selective_scan_half_inputs_compute_in_float32():
    x = make_scan_inputs("var", torch.float32, with_bias=False)
    xb = {k: (v.detach().to(torch.bfloat16) if v is not None else None) for k, v in x.items()}
    y, last = selective_scan(**xb, delta_softplus=True, return_last_state=True)
    y_ref = selective_scan_reference(**xb, delta_softplus=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)  # bf16 ulps


def test_selective_scan_large_steps_stay_finite():
    """Large step sizes (dt A << 0) only ever exponentiate non-positive numbers."""
    x = make_scan_inputs("var", torch.float32, with_z=False)
    with torch.no_grad():
        x["delta"].mul_(0).add_(50.0)  # dt = softplus(50 + bias) ~ 50: exp(dt A) underflows
    y = selective_scan(**x, delta_softplus=True)
    y_ref = selective_scan_reference(**x, delta_softplus=True)
    assert torch.isfinite(y).all()
    assert max_err(y, y_ref) <= 1e-5 * max(1.0, y_ref.abs().max().item())
    g = grads(y, x, torch.ones_like(y))
    assert all(torch.isfinite(v).all() for v in g.values())


def test_selective_scan_keeps_no_state_sized_tensors_for_backward():
    """Memory: nothing of size batch x dim x length x d_state is saved (states recomputed)."""
    x = make_scan_inputs("var", torch.float32, batch=8, dim=16, length=20, d_state=16)
    inputs = {t.untyped_storage().data_ptr() for t in x.values() if t is not None}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(**x, delta_softplus=True)
    state_bytes = 8 * 16 * 20 * 16 * 4
    assert sum(saved.values()) <= state_bytes / 8  # only the (batch, dim, length) pre-gate y


def test_reference_against_hand_computed_recurrence():
    """Ground truth for the ground truth: one channel, one state, two steps, by hand."""
    u = torch.tensor([[[2.0, -1.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5, 0.25]]], dtype=torch.float64)
    A = torch.tensor([[-1.5]], dtype=torch.float64)
    B = torch.tensor([[[0.7, -0.3]]], dtype=torch.float64)  # (batch, N, L)
    C = torch.tensor([[[1.1, 0.9]]], dtype=torch.float64)
    D = torch.tensor([0.2], dtype=torch.float64)
    z = torch.tensor([[[0.4, -2.0]]], dtype=torch.float64)
    h0 = 0.5 * 0.7 * 2.0
    h1 = math.exp(0.25 * -1.5) * h0 + 0.25 * -0.3 * -1.0
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    expected = [(1.1 * h0 + 0.2 * 2.0) * silu(0.4), (0.9 * h1 + 0.2 * -1.0) * silu(-2.0)]
    for fn in (selective_scan_reference, selective_scan):
        y, last = fn(u, delta, A, B, C, D, z, return_last_state=True)
        torch.testing.assert_close(y.flatten(), torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(last.flatten(), torch.tensor([h1], dtype=torch.float64))


def test_selective_scan_rejects_bad_shapes():
    x = make_scan_inputs("var", torch.float32)
    with pytest.raises(ValueError, match="B"):
        selective_scan(**{**x, "B": x["B"][:, :, :-1]})
    with pytest.raises(ValueError, match="A"):
        selective_scan(**{**x, "A": x["A"][:-1]})


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


def test_mamba_block_uses_scan_like_the_reference(monkeypatch):
    torch.manual_seed(0)
    block = MambaBlock(16, d_state=4).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out = block(x)
    monkeypatch.setattr(mamba_mod, "selective_scan", selective_scan_reference)
    torch.testing.assert_close(block(x), out, rtol=0, atol=1e-12)


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


@pytest.mark.parametrize(
    "lengths",
    [torch.tensor([3, 0]), torch.tensor([3, -1]), torch.tensor([3, 9]), torch.tensor([3])],
)
def test_encoder_rejects_bad_lengths(lengths):
    enc = Mamba4RecEncoder(d_model=16, d_state=4)
    with pytest.raises(ValueError, match="lengths"):
        enc(torch.randn(2, 8, 16), lengths)
