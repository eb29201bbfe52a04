"""A torch.fx tracer that keeps whole blocks as leaves: timm's no-trace modules, every Conv2d
subclass, attention and MLP blocks, and partialize's own operators."""

from __future__ import annotations

import torch
from torch import fx, nn

from ..ops.registry import is_partial_op

ATTENTION_NAMES = ("Attention", "MultiheadAttention", "ShiftedWindowAttention", "ShiftedWindowAttentionV2")
MLP_NAMES = ("Mlp", "ConvMlp", "GluMlp", "SwiGLU", "SwiGLUPacked", "GatedMlp", "MLP", "MLPBlock")


def is_attention_block(m: nn.Module) -> bool:
    """timm ``Attention`` family, ``nn.MultiheadAttention``, torchvision ViT/Swin attention."""
    if isinstance(m, nn.MultiheadAttention):
        return True
    name = type(m).__name__
    return name in ATTENTION_NAMES or (name.endswith("Attention") and hasattr(m, "qkv"))


def is_mlp_block(m: nn.Module) -> bool:
    """timm ``Mlp``/``ConvMlp``/GLU variants and torchvision ``MLP``/``MLPBlock``."""
    return type(m).__name__ in MLP_NAMES


def _timm_notrace():
    try:
        from timm.layers import _fx as tfx

        return tfx.is_notrace_module, list(tfx.get_notrace_functions())
    except Exception:  # timm missing or changed: no extra leaves
        return (lambda m: False), []


class LeafTracer(fx.Tracer):
    """fx tracer whose leaves are the blocks partialize converts (and those timm says not to trace)."""

    def __init__(self) -> None:
        is_notrace, fns = _timm_notrace()
        super().__init__(autowrap_functions=tuple(fns))
        self._timm_notrace = is_notrace

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        """fx's own answer (a ``get_attr`` proxy for a parameter of the root, or for a buffer when
        buffers are proxied), found by a name table made once per trace: fx searches all of the root's
        parameters at every read of one (MobileNetV5: 69,000 comparisons, most of its trace time)."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if getattr(self, "_names_of", (None, None))[0] is not self.root:
            names: dict[int, str] = {}
            for n, p in self.root.named_parameters():
                names.setdefault(id(p), n)
            buffers: dict[int, str] = {}
            for n, b in self.root.named_buffers():
                buffers.setdefault(id(b), n)
            self._names_of = (self.root, names, buffers)
        _, names, buffers = self._names_of
        name = names.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_partial_op(m) or isinstance(m, nn.Conv2d) or is_attention_block(m) or is_mlp_block(m):
            return True
        try:
            if self._timm_notrace(type(m)):
                return True
        except Exception:
            pass
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` with LeafTracer; raises whatever fx raises on failure."""
    graph = LeafTracer().trace(model)
    return fx.GraphModule(model, graph, class_name=type(model).__name__ + "Traced")


def example_input_for(model: nn.Module, input_size: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """A batch-1 random input: ``input_size`` if given, else the size a ViT's patch embedding was
    built for (``img_size=...`` overrides the config), else the model's pretrained_cfg, else 224."""
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if input_size is None and isinstance(fixed, (tuple, list)) and len(fixed) == 2:
        input_size = tuple(int(v) for v in fixed)
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = tuple(cfg.get("input_size", (3, 224, 224)))
    elif isinstance(input_size, int):
        size = (3, input_size, input_size)
    elif len(input_size) == 2:
        size = (3, *input_size)
    else:
        size = tuple(input_size)
    p = next((t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn((1, *size), generator=gen).to(device=device, dtype=dtype)
