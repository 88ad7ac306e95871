"""torch.nn modules built on spruce's structured matrices.

Layers replacing ``nn.Linear``: :class:`ButterflyLinear`, :class:`MonarchLinear`,
:class:`KroneckerLinear`. Adapters wrapping an existing ``nn.Linear`` (forward = base +
adapter, ``merge()``/``unmerge()``, ``parameter_count()``): :class:`LoKr`, :class:`KronA`,
:class:`Compacter`, :class:`BOFT`, :class:`OFT`; :func:`from_peft` converts trained PEFT
adapters. Tensor-network layers: :class:`MPOLinear`, :class:`TuckerConv2d` (from
:mod:`spruce.tn`). Every module runs under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from ..tn.layers import MPOLinear, PerformanceWarning, TuckerConv2d
from ._adapters import BOFT, OFT, Compacter, KronA, LoKr
from ._layers import ButterflyLinear, KroneckerLinear, MonarchLinear
from ._peft import from_peft

__all__ = [
    "ButterflyLinear",
    "MonarchLinear",
    "KroneckerLinear",
    "LoKr",
    "KronA",
    "Compacter",
    "BOFT",
    "OFT",
    "from_peft",
    "MPOLinear",
    "TuckerConv2d",
    "PerformanceWarning",
]
