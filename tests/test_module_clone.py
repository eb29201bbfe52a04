"""``ops._utils.clone_module``: the faster deep copy of a module. Oracle: ``copy.deepcopy`` of the
same module (structure, values, dtype, modes, hooks, tied submodules) and independence from the
original (no shared storage; an in-place change of the copy leaves the original alone)."""

from __future__ import annotations

import copy

import timm
import torch
from _helpers import nondegenerate_
from torch import nn

from partialize.ops._utils import clone_module


def _same(a: nn.Module, b: nn.Module) -> None:
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype, k
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]


def test_clone_equals_deepcopy_on_real_models():
    for name in ("efficientnet_b0", "levit_128s", "convit_tiny"):
        torch.manual_seed(0)
        m = nondegenerate_(timm.create_model(name).eval())
        c = clone_module(m)
        _same(copy.deepcopy(m), c)
        held = {p.untyped_storage().data_ptr() for p in m.parameters()}
        assert not any(p.untyped_storage().data_ptr() in held for p in c.parameters())
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(m(x), c(x))
            next(c.parameters()).add_(1.0)
            assert not torch.equal(next(m.parameters()), next(c.parameters()))


class _Custom(nn.Module):
    """A class with copy rules of its own: deepcopy's path must be kept."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.copies = 0

    def __deepcopy__(self, memo):
        new = _Custom()
        new.copies = self.copies + 1
        return new


def test_tied_children_stay_tied_hooks_copied_and_custom_classes_keep_their_rules():
    shared = nn.Linear(3, 3)
    m = nn.Sequential(shared, nn.ReLU(), shared, _Custom())
    m[1].register_forward_hook(lambda mod, i, o: o * 2)
    c = clone_module(m)
    assert c[0] is c[2] and c[0] is not shared
    assert len(c[1]._forward_hooks) == 1 and c[1]._forward_hooks is not m[1]._forward_hooks
    assert c[3].copies == 1  # its __deepcopy__ ran
    x = torch.randn(2, 3)
    assert torch.equal(c[:3](x), m[:3](x))


def test_placeholders_leave_a_layer_out_only_where_it_is_held_once_in_a_module_slot():
    """A replaced layer held once is not copied (an Identity in its place); held under a second name or
    in a plain list, a placeholder would stay where the original had the layer, so the copy is full."""
    from partialize.ops._utils import placeholders

    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    memo = placeholders(block, [block[0]])
    copy_ = clone_module(block, memo)
    assert isinstance(copy_[0], nn.Identity) and isinstance(copy_[2], nn.Linear) and copy_[2] is not block[2]
    tied = nn.Sequential(block[0], nn.ReLU(), block[0])
    assert placeholders(tied, [tied[0]]) == {}
    listed = nn.Sequential(nn.Linear(4, 4))
    listed.taps = [listed[0]]  # a plain attribute holding the layer
    assert placeholders(listed, [listed[0]]) == {}
    assert placeholders(block, [None, "not a module"]) == {}
