"""Partial-channel operators: plain nn.Modules with ``from_module`` and ``deploy``."""

from .adapconv import AdaPConv
from .attention import (
    FusedChannelGate,
    GaussianChannelAttention,
    MergedSpatialAttention,
    PartialSelfAttention,
    PartialSpatialAttention,
)
from .dpconv import DPConv
from .patconv import PATConv, PATConvDeploy
from .pconv import PConv
from .registry import get_operator, is_partial_op, list_operators, register_operator

__all__ = [
    "AdaPConv",
    "DPConv",
    "FusedChannelGate",
    "GaussianChannelAttention",
    "MergedSpatialAttention",
    "PATConv",
    "PATConvDeploy",
    "PConv",
    "PartialSelfAttention",
    "PartialSpatialAttention",
    "get_operator",
    "is_partial_op",
    "list_operators",
    "register_operator",
]

from .partial_blocks import PartialAttention, PartialMLP  # noqa: E402
from .partial_residual import PartialResidual  # noqa: E402

__all__ += ["PartialAttention", "PartialMLP", "PartialResidual"]
