"""Single-head partial attention (``single_head_attention``), in the style of SHViT's single-head
self-attention (Yun & Ro, "SHViT", CVPR 2024; not one of papers 000-004).

One attention head reads a share of the channels (the last ``round(ratio * C)``, the project's
convention for the expensive part); a projection over all channels then mixes the head's output with
the other channels, which skip attention: ``y = W [attn(x_a); x_r] + b``. Whole-head slicing
(``partial_attention``) keeps several heads reading a share of the channels; this keeps one head and
cuts what it reads, so the q/k/v projection and the attention itself shrink by the head count as well.

Built from a trained layer, it starts from the original's most important head: its q/k/v rows on the
kept channels, its proj columns, the proj bias; the projection's columns for the other channels start
at zero (they train from there). Importance is the size of what a head adds to the output:
``||W_v,h||_F * ||W_proj[:, h]||_F`` from the weights, or, when ``head_scores`` is given (from
calibration data), those scores. Choices where SHViT differs, written down in docs/operators.md: no
norm on the attention channels (the block's pre-norm is the original's), the original's q/k width and
scale, and no activation before the projection (it would break the start from the original head).

Accepted: timm ``Attention`` (q/k norms carried) and timm MetaFormer ``Attention``. At ``ratio=1``
the head reads every channel and the layer equals the original with the other heads' proj columns
zero (``faithful_original``): the contract's check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OperatorError
from ._utils import clone_module, linear_from, split_channels
from .base import PartialOperator
from .partial_blocks import _head_rows, _qualname
from .registry import register_operator

_CLASSES = ("timm.layers.attention.Attention", "timm.models.metaformer.Attention")


def head_importance(original: nn.Module) -> torch.Tensor:
    """Per head: ||W_v,h||_F * ||W_proj[:, h]||_F, the weight-norm size of what the head adds."""
    h, d = original.num_heads, original.head_dim
    dim = h * d
    wv = original.qkv.weight.detach()[2 * dim : 3 * dim].reshape(h, d, -1)
    wp = original.proj.weight.detach().reshape(-1, h, d)
    return wv.flatten(1).norm(dim=1) * wp.transpose(0, 1).flatten(1).norm(dim=1)


def head_output_scores(original: nn.Module, calls: list, chunk: int = 64) -> torch.Tensor:
    """Per head, the mean squared norm of what it adds to the output, ``W_proj[:, h] o_h``, over the
    tokens of ``calls`` (timm Attention / MetaFormer Attention: qkv, q/k norms, scale, proj)."""
    h, d = original.num_heads, original.head_dim
    wp = original.proj.weight.detach().reshape(-1, h, d)  # (C, heads, d)
    total, count = torch.zeros(h, dtype=torch.float64), 0
    with torch.no_grad():
        for args, _ in calls:
            x = args[0]
            t = x.reshape(x.shape[0], -1, x.shape[-1])
            for part in t.split(chunk):
                b, n, _ = part.shape
                q, k, v = original.qkv(part).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
                q, k = original.q_norm(q), original.k_norm(k)
                o = F.scaled_dot_product_attention(q, k, v, scale=getattr(original, "scale", None))  # (b, h, n, d)
                y = torch.einsum("bhnd,chd->bhnc", o, wp)
                total += y.square().sum(dim=(0, 2, 3)).double().cpu()
                count += b * n
    return (total / max(count, 1)).float()


@register_operator("single_head_attention")
class SingleHeadAttention(PartialOperator):
    """One head on the last ``dim_attn`` channels, a projection over [head output; other channels]."""

    faithful_params = {"ratio": 1.0}

    def __init__(self, dim: int, dim_attn: int, head_dim: int, qkv_bias: bool, proj_bias: bool, scale: float):
        super().__init__()
        if not 0 < dim_attn <= dim:
            raise OperatorError(f"single_head_attention needs 1..{dim} attention channels, got {dim_attn}")
        self.dim, self.dim_attn, self.dim_rest, self.head_dim = dim, dim_attn, dim - dim_attn, head_dim
        self.scale = scale
        self.head = 0  # index of the original head it started from
        self.qkv = nn.Linear(dim_attn, 3 * head_dim, bias=qkv_bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.proj = nn.Linear(head_dim + self.dim_rest, dim, bias=proj_bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, attn_channels={self.dim_attn} (1 head of {self.head_dim}, from head {self.head}), "
            f"rest={self.dim_rest}"
        )

    @property
    def ratio(self) -> float:
        return self.dim_attn / self.dim

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise OperatorError("single_head_attention does not take an attention mask or causal attention")
        shape = x.shape
        t = x.reshape(shape[0], -1, shape[-1])  # (B, N, C); MetaFormer's (B, H, W, C) too
        rest, xa = torch.split(t, [self.dim_rest, self.dim_attn], dim=-1)
        q, k, v = self.qkv(xa).unsqueeze(1).chunk(3, dim=-1)  # (B, 1, N, d) each: one head
        o = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, scale=self.scale).squeeze(1)
        y = self.proj(torch.cat((o, rest), dim=-1) if self.dim_rest else o)
        return y.reshape(shape)

    @classmethod
    def from_module(
        cls, original: nn.Module, ratio: float = 0.25, head: int | str = "auto", head_scores=None
    ) -> SingleHeadAttention:
        """From timm ``Attention`` / MetaFormer ``Attention``: the head ``head`` ("auto": the most important
        by ``head_scores`` or by :func:`head_importance`), reading the last ``round(ratio * C)`` channels."""
        kind = _qualname(original)
        if kind not in _CLASSES:
            raise OperatorError(
                f"single_head_attention converts timm Attention and MetaFormer Attention only, not {kind} "
                "(other classes may compute more than q/k/v/proj: position biases, windows, masks)"
            )
        if not isinstance(getattr(original, "norm", nn.Identity()), nn.Identity):
            raise OperatorError(f"single_head_attention: {kind} normalises the concatenated heads (scale_norm)")
        if getattr(original, "gate", None) is not None:
            raise OperatorError(f"single_head_attention: {kind} gates its output per channel")
        h, d = original.num_heads, original.head_dim
        dim = original.qkv.in_features
        if h * d != dim or original.proj.out_features != dim or original.qkv.out_features != 3 * dim:
            raise OperatorError(
                f"single_head_attention needs attention width == model width in {kind} ({h} x {d} heads, {dim} in)"
            )
        if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise OperatorError(f"single_head_attention ratio (channels the head reads) must be in (0, 1]: {ratio!r}")
        dim_attn = dim if ratio >= 1 else max(1, split_channels(dim, ratio))
        if head == "auto":
            scores = head_importance(original) if head_scores is None else torch.as_tensor(head_scores).float()
            if scores.shape != (h,):
                raise OperatorError(f"single_head_attention head_scores needs {h} values, got {tuple(scores.shape)}")
            head = int(scores.argmax())
        if not isinstance(head, int) or not 0 <= head < h:
            raise OperatorError(f"single_head_attention head must be 'auto' or 0..{h - 1}, got {head!r}")
        w, b = original.qkv.weight.detach(), original.qkv.bias
        rows = torch.cat([j * dim + _head_rows([head], h, d, 0) for j in range(3)]).to(w.device)
        lo = dim - dim_attn
        op = cls(dim, dim_attn, d, b is not None, original.proj.bias is not None, getattr(original, "scale", d**-0.5))
        op.head = head
        op.qkv = linear_from(w[rows, lo:], b.detach()[rows] if b is not None else None)
        wp = original.proj.weight.detach()
        proj_w = torch.cat((wp[:, head * d : (head + 1) * d], wp.new_zeros(dim, lo)), dim=1)
        pb = original.proj.bias
        op.proj = linear_from(proj_w, pb.detach() if pb is not None else None)
        for attr in ("q_norm", "k_norm"):  # per head over head_dim: the same module serves the one head
            norm = getattr(original, attr, None)
            if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
                setattr(op, attr, clone_module(norm))
        return op.to(w.device)

    @classmethod
    def faithful_original(cls, module: nn.Module) -> nn.Module | None:
        """The original with every head but the most important one silenced (its proj columns zero)."""
        if _qualname(module) not in _CLASSES:
            return None
        m = clone_module(module)
        keep = int(head_importance(module).argmax())
        d = module.head_dim
        with torch.no_grad():
            cols = torch.ones(m.proj.in_features, dtype=torch.bool)
            cols[keep * d : (keep + 1) * d] = False
            m.proj.weight[:, cols] = 0
        return m

    @classmethod
    def data_params(cls, original: nn.Module, calls: list, params) -> dict:
        """The head by what each adds to the output on the calibration images (unless the recipe names one)."""
        if _qualname(original) not in _CLASSES or params.get("head", "auto") != "auto" or not calls:
            return {}
        return {"head_scores": [round(float(v), 6) for v in head_output_scores(original, calls)]}

    def deploy(self) -> SingleHeadAttention:
        """Inference form: eval mode, frozen."""
        return clone_module(self).eval().requires_grad_(False)
