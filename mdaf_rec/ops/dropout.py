"""Dropout whose mask costs a quarter of the random draws: four 16-bit draws per 64-bit word.

``nn.Dropout`` on CPU draws one MT19937 number per element (``bernoulli_``): at the demo's dims
that was 15% of an MDAF-Mamba training step. :class:`Dropout` fills a quarter as many 64-bit words
(``random_`` over the full int64 range), reads them as 16-bit integers and keeps an element when
its integer is at or above a threshold: the drop probability is ``p`` rounded to a multiple of
``1 / 65536`` (off by at most 7.6e-6), and kept elements are scaled by the exact inverse of the
keep probability, so the expectation is unchanged. Same generator as ``nn.Dropout`` (the global
one: seeding and checkpointed RNG states work alike); identity in eval mode, as ``nn.Dropout``.
"""

import torch
from torch import nn

__all__ = ["Dropout"]

_LEVELS = 1 << 16


class Dropout(nn.Module):
    """Drop-in for ``nn.Dropout(p)`` (no parameters, same ``p`` / ``training`` behaviour).

    Args:
        p (float): drop probability in ``[0, 1)``.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.drop_levels = round(p * _LEVELS)  # drop when the 16-bit draw is among the lowest
        self.scale = _LEVELS / (_LEVELS - self.drop_levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_levels == 0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        words.random_(-(1 << 63), (1 << 63) - 1)
        draws = words.view(torch.int16)[:n].view(x.shape)  # uniform in [-32768, 32767]
        mask = (draws >= self.drop_levels - _LEVELS // 2).to(x.dtype).mul_(self.scale)
        return x * mask  # one pass forward, one backward

    def extra_repr(self) -> str:
        return f"p={self.p}"
