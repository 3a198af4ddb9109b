"""SELSA's attention as one fused scaled-dot-product attention, for inference.

:meth:`viddet.models.aggregators.SelsaAggregator.forward_projected` follows MMTracking's
``SelsaAggregator.forward``: ``bmm(q, k^T) / sqrt(d)``, a softmax over the m reference proposals,
``bmm(A, v)``, per head. Offline SELSA attends 300 key proposals to 15 x 300 = 4500 reference
proposals in 16 heads of 64 channels, so the (16, 300, 4500) weight tensor (86 MB) is written and
read four times (product, division, softmax, product) for ~5.5 GFLOP of arithmetic: memory-bound,
~0.26 s per aggregator at one thread on a 2-core Xeon. PyTorch's
``F.scaled_dot_product_attention`` computes the same ``softmax(q k^T / sqrt(d)) v`` blockwise
(flash attention on the CPU) without materialising the weights: ~0.09 s. The result equals the
plain path up to float32 rounding (a different summation order; ~1e-7 relative).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from viddet.models.aggregators import SelsaAggregator, SelsaRefProjections
from viddet.models.fast import FastModule

__all__ = ['FastSelsaAggregator']


class FastSelsaAggregator(FastModule, SelsaAggregator):
    """:class:`viddet.models.aggregators.SelsaAggregator` whose :meth:`forward_projected` runs the
    attention as one fused ``F.scaled_dot_product_attention`` (module docstring) for float32 CPU
    inference; the plain bmm path while autograd records, for other dtypes or devices, or for
    inputs of unexpected shape."""

    def forward_projected(self, x: torch.Tensor, refs: SelsaRefProjections) -> torch.Tensor:
        """x (n, C), reference key / value (m, C) -> (n, C), as the plain method."""
        if torch.is_grad_enabled() or x.dim() != 2 or x.dtype != torch.float32 or x.device.type != 'cpu' \
                or refs.key.dim() != 2 or refs.key.shape != refs.value.shape \
                or x.shape[1] != self.in_channels or refs.key.shape[1] != self.in_channels \
                or refs.key.dtype != x.dtype or refs.key.shape[0] == 0:
            return super().forward_projected(x, refs)
        n, c = x.shape
        m = refs.key.shape[0]
        g = self.num_attention_blocks
        d = c // g
        q = self.fc_embed(x).view(n, g, d).transpose(0, 1).unsqueeze(0)          # (1, G, n, d)
        k = refs.key.reshape(m, g, d).transpose(0, 1).unsqueeze(0)               # (1, G, m, d)
        v = refs.value.reshape(m, g, d).transpose(0, 1).unsqueeze(0)             # (1, G, m, d)
        out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                             scale=1.0 / d ** 0.5)               # (1, G, n, d)
        return self.fc(out[0].transpose(0, 1).reshape(n, c))
