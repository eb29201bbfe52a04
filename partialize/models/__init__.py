"""Native models registered with timm on import."""

from .partialnet import VARIANTS, PartialNet, PartialNetBlock, PartialSpatialConv

__all__ = ["VARIANTS", "PartialNet", "PartialNetBlock", "PartialSpatialConv"]
