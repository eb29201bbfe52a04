"""Partial-channel operators: subclasses of :class:`PartialOperator` (the contract, ``base.py``),
registered by name for recipes."""

from .adapconv import AdaPConv
from .attention import (
    FusedChannelGate,
    GaussianChannelAttention,
    MergedSpatialAttention,
    PartialSelfAttention,
    PartialSpatialAttention,
)
from .base import InferenceForm, PartialOperator
from .dpconv import DPConv
from .patconv import PATConv, PATConvDeploy
from .pconv import PConv
from .registry import (
    get_operator,
    is_partial_layer,
    is_partial_op,
    list_operators,
    operators_in,
    register_operator,
    unregister_operator,
)

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
    "InferenceForm",
    "PartialOperator",
    "get_operator",
    "is_partial_layer",
    "is_partial_op",
    "list_operators",
    "operators_in",
    "register_operator",
    "unregister_operator",
]

from .partial_blocks import PartialAttention, PartialMLP  # noqa: E402
from .partial_residual import PartialResidual  # noqa: E402
from .single_head import SingleHeadAttention  # noqa: E402

__all__ += ["PartialAttention", "PartialMLP", "PartialResidual", "SingleHeadAttention"]
from .partial_kernel import PartialKernel  # noqa: E402

__all__ += ["PartialKernel"]
