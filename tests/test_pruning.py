"""One-shot pruning at a channel ratio (the accuracy benchmark's Torch-Pruning baseline): which channels
survive is checked against importances computed here by hand from the weights (and, for Taylor, from
gradients taken here with autograd), not against torch-pruning's own scorer."""

import pytest
import torch
from torch import nn

from partialize.measure.pruning import PruningError, prune_to_ratio


class TwoConv(nn.Module):
    """conv1 (3 -> 8) -> ReLU -> conv2 (8 -> 4) -> pool -> fc: the group pruned at conv1's output is
    exactly {conv1 out, conv2 in}; fc is the classifier (kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


def _model(seed: int = 0) -> TwoConv:
    torch.manual_seed(seed)
    return TwoConv().eval()


def _kept(score: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(score, k).indices.tolist())


def _kept_in_pruned(orig: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which of the original conv1 filters the pruned conv1 holds (each must match one exactly)."""
    out = []
    for w in pruned:
        hits = [i for i, v in enumerate(orig) if torch.equal(v, w)]
        assert len(hits) == 1
        out.append(hits[0])
    return out


def test_magnitude_keeps_the_channels_with_the_largest_group_norm():
    model = _model()
    w1, w2 = model.conv1.weight.detach().clone(), model.conv2.weight.detach().clone()
    # group L2 importance by hand: squared norm of the channel's weights in each member, averaged
    score = (w1.flatten(1).square().sum(1) + w2.transpose(0, 1).flatten(1).square().sum(1)) / 2
    pruned, info = prune_to_ratio(model, 0.5, 8)
    kept = _kept_in_pruned(w1, pruned.conv1.weight)
    assert kept == _kept(score, 4)
    for row in pruned.conv2.weight:  # conv2 reads the same channels: each kept filter is w2[j, kept]
        assert any(torch.equal(row, w2[j, kept]) for j in range(w2.shape[0]))
    assert pruned.conv2.in_channels == 4 and pruned.conv2.out_channels == 2  # ratio 0.5 of both groups
    assert pruned.fc.out_features == 10  # the classifier keeps its classes
    assert info["reached_macs"] < info["original_macs"]
    assert torch.equal(model.conv1.weight, w1)  # the input model is untouched


def test_a_frozen_model_is_pruned_like_a_trainable_one():
    """Regression: torch-pruning traces through autograd, so a model with requires_grad=False (a frozen
    teacher) came back unpruned, with its full MACs reported as the pruned model's."""
    from partialize.measure.pruning import prune_to_macs

    model = _model()
    frozen = _model().requires_grad_(False)
    pruned, _ = prune_to_ratio(frozen, 0.5, 8)
    assert pruned.conv1.out_channels == 4 and pruned.conv2.out_channels == 2  # as the trainable model's
    assert torch.equal(pruned.conv1.weight, prune_to_ratio(model, 0.5, 8)[0].conv1.weight)
    _, info = prune_to_macs(frozen, 0.5 * 8 * 8 * (3 * 8 * 9 + 8 * 4 * 9), 8, tolerance=0.25)  # half the convs'
    assert info["reached_macs"] < info["original_macs"]
    assert not any(p.requires_grad for p in frozen.parameters())  # the input is left as it was


def test_taylor_keeps_the_channels_with_the_largest_first_order_term():
    model = _model(1)
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = _model(1)
    with torch.no_grad():
        labels = ref(x).argmax(1)  # what taylor uses without labels: the model's own prediction
    nn.functional.cross_entropy(ref(x), labels).backward()
    w1, g1 = ref.conv1.weight.detach(), ref.conv1.weight.grad
    w2, g2 = ref.conv2.weight.detach(), ref.conv2.weight.grad
    score = ((w1 * g1).abs().flatten(1).sum(1) + (w2 * g2).abs().transpose(0, 1).flatten(1).sum(1)) / 2
    pruned, info = prune_to_ratio(model, 0.5, 8, importance="taylor", images=x)
    kept = _kept_in_pruned(w1, pruned.conv1.weight)
    assert kept == _kept(score, 4)
    magnitude = (w1.flatten(1).square().sum(1) + w2.transpose(0, 1).flatten(1).square().sum(1)) / 2
    assert kept != _kept(magnitude, 4)  # the two criteria really choose differently here
    assert info["taylor"]["labels"] == "model argmax"
    assert all(p.grad is None for p in pruned.parameters())  # no gradients left behind


def test_taylor_with_given_labels_uses_them():
    model = _model(3)
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.arange(32) % 10
    ref = _model(3)
    nn.functional.cross_entropy(ref(x), y).backward()
    w1, g1, w2, g2 = ref.conv1.weight.detach(), ref.conv1.weight.grad, ref.conv2.weight.detach(), ref.conv2.weight.grad
    score = ((w1 * g1).abs().flatten(1).sum(1) + (w2 * g2).abs().transpose(0, 1).flatten(1).sum(1)) / 2
    pruned, info = prune_to_ratio(model, 0.25, 8, importance="taylor", images=x, labels=y)
    assert _kept_in_pruned(w1, pruned.conv1.weight) == _kept(score, 6)
    assert info["taylor"]["labels"] == "given"


def test_fused_qkv_attention_keeps_equal_heads():
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10
    ).eval()
    pruned, _ = prune_to_ratio(vit, 0.25, 16)
    attn = pruned.blocks[0].attn
    assert attn.num_heads == 2
    assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
    assert attn.head_dim == 12  # 16 per head, a quarter removed from each
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_bad_arguments_are_errors():
    with pytest.raises(PruningError, match="ratio"):
        prune_to_ratio(_model(), 1.0, 8)
    with pytest.raises(PruningError, match="images"):
        prune_to_ratio(_model(), 0.5, 8, importance="taylor")
    with pytest.raises(PruningError, match="importance"):
        prune_to_ratio(_model(), 0.5, 8, importance="random")
