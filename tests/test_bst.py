import pytest
import torch

from device_guards import no_host_sync
from mdaf_rec.models.bst import BSTEncoder, MultiHeadSelfAttention, TransformerLayer

D_MODEL = 32


def _encoder(**kwargs) -> BSTEncoder:
    torch.manual_seed(0)
    params = dict(d_model=D_MODEL, num_layers=2, num_heads=4, dropout=0.1, max_len=11)
    params.update(kwargs)
    return BSTEncoder(**params)


def _pad(sequences, length, fill):
    """Right-pads ``[len_i, D]`` sequences to ``[B, length, D]`` with values from ``fill``."""
    out = fill((len(sequences), length, D_MODEL))
    for i, seq in enumerate(sequences):
        out[i, : seq.size(0)] = seq
    return out


def test_shape():
    encoder = _encoder().eval()
    tokens = torch.randn(3, 9, D_MODEL)
    out = encoder(tokens, torch.tensor([9, 1, 4]))
    assert out.shape == (3, D_MODEL)
    torch.testing.assert_close(encoder(tokens, torch.tensor([9, 1, 4], dtype=torch.int32)), out)
    assert MultiHeadSelfAttention(D_MODEL, 4, 0.0)(
        torch.randn(2, 5, D_MODEL), torch.ones(2, 5, dtype=torch.bool)
    ).shape == (2, 5, D_MODEL)
    assert TransformerLayer(D_MODEL, 4, 64, 0.0)(
        torch.randn(2, 5, D_MODEL), torch.ones(2, 5, dtype=torch.bool)
    ).shape == (2, 5, D_MODEL)


@pytest.mark.parametrize("use_layer_norm", [True, False])
def test_padding_invariance(use_layer_norm):
    encoder = _encoder(use_layer_norm=use_layer_norm).eval()
    torch.manual_seed(1)
    lengths = torch.tensor([5, 1, 8, 11])
    sequences = [torch.randn(int(n), D_MODEL) for n in lengths]
    tight = encoder(_pad(sequences, 11, torch.zeros), lengths)
    garbage = encoder(_pad(sequences, 11, lambda s: 100 * torch.randn(s)), lengths)
    longer = encoder(_pad(sequences, 20, lambda s: torch.full(s, float("nan"))), lengths)
    torch.testing.assert_close(garbage, tight, rtol=0, atol=1e-6)
    torch.testing.assert_close(longer, tight, rtol=0, atol=1e-6)
    for i, seq in enumerate(sequences):  # each sequence alone, no padding at all
        alone = encoder(seq[None], lengths[i : i + 1])
        torch.testing.assert_close(alone[0], tight[i], rtol=0, atol=1e-6)


def test_attention_mask():
    encoder = _encoder().eval()
    torch.manual_seed(2)
    tokens = torch.randn(2, 8, D_MODEL)
    lengths = torch.tensor([5, 8])
    base = encoder(tokens, lengths)

    padded_changed = tokens.clone()
    padded_changed[0, 6] = torch.randn(D_MODEL)  # index 6 >= length 5: padding
    torch.testing.assert_close(encoder(padded_changed, lengths), base, rtol=0, atol=0)

    history_changed = tokens.clone()
    history_changed[0, 0] = torch.randn(D_MODEL)  # oldest valid history token of sample 0
    out = encoder(history_changed, lengths)
    assert (out[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(out[1], base[1], rtol=0, atol=0)  # samples don't interact


def test_order_matters():
    encoder = _encoder().eval()
    torch.manual_seed(3)
    tokens = torch.randn(1, 6, D_MODEL)
    lengths = torch.tensor([6])
    swapped = tokens[:, [1, 0, 2, 3, 4, 5]]
    assert (encoder(swapped, lengths) - encoder(tokens, lengths)).abs().max() > 1e-4


def test_every_parameter_gets_gradient():
    encoder = _encoder(max_len=8).train()
    torch.manual_seed(4)
    lengths = torch.arange(1, 9)  # uses every position embedding row
    tokens = torch.randn(8, 8, D_MODEL, requires_grad=True)
    out = encoder(tokens, lengths)
    # A random projection: sum() of a LayerNorm output has zero gradient w.r.t. its input.
    (out * torch.randn_like(out)).sum().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    assert encoder.position.weight.grad.abs().sum(dim=1).gt(0).all()
    padded = torch.arange(8)[None, :] >= lengths[:, None]
    assert tokens.grad[padded].abs().sum() == 0


def test_forward_and_backward_make_no_host_sync():
    """Lengths are not read on the host (they are validated where data enters, see embeddings.py)."""
    encoder = _encoder()
    tokens = torch.randn(4, 9, D_MODEL, requires_grad=True)
    with no_host_sync():
        encoder(tokens, torch.tensor([9, 1, 4, 2])).sum().backward()
    assert tokens.grad is not None and bool(tokens.grad[1, 1:].eq(0).all())  # padding gets no gradient


def test_lengths_shape_is_checked():
    with pytest.raises(ValueError, match="lengths"):
        _encoder()(torch.randn(2, 5, D_MODEL), torch.tensor([[3, 2]]))


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="num_heads"):
        BSTEncoder(d_model=30, num_heads=4)
