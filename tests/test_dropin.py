"""A split model is a drop-in: everything but the optimizer sees the original model.

Oracle everywhere: the unsplit model, given the same calls.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, cols, rows


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 5))


def _plans(shape=(9, 12)):
    g = torch.Generator().manual_seed(3)
    return {
        "rows": rows({(0, 4): {"weight_decay": 0.0}, (4, None): FROZEN}),
        "cols": cols({(2, 7): {"weight_decay": 0.3}}),
        "mask": Regions(torch.randint(0, 3, shape, generator=g),
                        {0: {"lr": 0.01}, 1: {"weight_decay": 0.2}, 2: FROZEN}),
        "decay-tensor": torch.where(torch.rand(shape, generator=g) < 0.3, 0.01, 0.1),
        "sparse": Regions(torch.rand(shape, generator=g) < 0.2,  # 80% FROZEN: the sparse layout
                          {True: {"weight_decay": 0.2}, False: FROZEN}),
    }


KINDS = list(_plans())


def _pair(kind, seed=0):
    model = _linear(seed)
    ref = copy.deepcopy(model)
    split_model, groups = paramsplit.split(model, {"0.weight": _plans()[kind]})
    return ref, split_model, groups


def _assert_same(split_model, ref, x=None):
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(11)) if x is None else x
    with torch.no_grad():
        assert torch.equal(split_model(x), ref(x))
    sd, want = split_model.state_dict(), ref.state_dict()
    assert list(sd) == list(want)
    for k in want:
        assert sd[k].shape == want[k].shape and sd[k].dtype == want[k].dtype, k
        assert torch.equal(sd[k], want[k]), k


# -- state dict: the original format ------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_has_the_original_keys_and_loads_strict_both_ways(kind):
    ref, sm, _ = _pair(kind)
    _assert_same(sm, ref)
    other = _linear(seed=5)
    sm.load_state_dict(other.state_dict())  # strict, original format
    _assert_same(sm, other)
    fresh = _linear(seed=9)
    fresh.load_state_dict(sm.state_dict())
    _assert_same(sm, fresh)


def _two_masks():
    """Two scattered masks (the mask layout) with equal region sizes: equal part shapes."""
    a = (torch.arange(9)[:, None] + torch.arange(12)) % 2
    opts = {0: {"weight_decay": 0.0}, 1: {"weight_decay": 0.1}}
    return Regions(a, opts), Regions(1 - a, opts)


def test_checkpoint_of_another_mask_loads_by_position_not_by_part():
    """Two masks with equal region sizes: the weights land where they belong."""
    model = _linear()
    a, b = _two_masks()
    sm_a, _ = paramsplit.split(model, {"0": a})
    sm_b, _ = paramsplit.split(_linear(seed=1), {"0": b})
    sm_b.load_state_dict(sm_a.state_dict())
    _assert_same(sm_b, model)


def test_old_part_keys_are_refused_not_loaded():
    ref, sm, _ = _pair("mask")
    bad = {k: v for k, v in sm.state_dict().items() if k != "0.weight"}
    bad.update({f"0.weight__{i}": p.detach() for i, p in enumerate(
        [sm[0].weight__0, sm[0].weight__1, sm[0].weight__2])})
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"0.weight\""):
        sm.load_state_dict(bad)
    missing, unexpected = sm.load_state_dict(bad, strict=False)
    assert missing == ["0.weight"] and unexpected == [f"0.weight__{i}" for i in range(3)]
    _assert_same(sm, ref)  # nothing was loaded


def test_optimizer_state_of_another_layout_is_refused():
    model = _linear()
    a, b = _two_masks()
    sm_a, groups_a = paramsplit.split(model, {"0": a})
    opt_a = torch.optim.AdamW(groups_a, lr=1e-2)
    sm_a(torch.randn(3, 12)).sum().backward()
    opt_a.step()
    sm_b, groups_b = paramsplit.split(_linear(), {"0": b})
    opt_b = torch.optim.AdamW(groups_b, lr=1e-2)
    opt_b.load_state_dict(opt_a.state_dict())  # same sizes: torch cannot tell
    sm_b(torch.randn(3, 12)).sum().backward()
    with pytest.raises(RuntimeError, match="split another way"):
        opt_b.step()
    # the same layout loads and steps
    sm_c, groups_c = paramsplit.split(_linear(), {"0": a})
    opt_c = torch.optim.AdamW(groups_c, lr=1e-2)
    opt_c.load_state_dict(opt_a.state_dict())
    sm_c(torch.randn(3, 12)).sum().backward()
    opt_c.step()


# -- writes through owner.weight land in the parts ----------------------------------------------

WRITES = {
    "init.normal_": lambda m: nn.init.normal_(m.weight),
    "data.normal_": lambda m: m.weight.data.normal_(),
    "data.copy_": lambda m: m.weight.data.copy_(torch.arange(108.0).view(9, 12)),
    "reset_parameters": lambda m: m.reset_parameters(),
    "no_grad mul_": lambda m: _no_grad(lambda: m.weight.mul_(0.5)),
    "no_grad setitem": lambda m: _no_grad(lambda: m.weight.__setitem__(0, 3.0)),
    "data = t": lambda m: setattr(m.weight, "data", torch.full((9, 12), 0.25)),
    "data.setitem": lambda m: m.weight.data.__setitem__((slice(None), 3), -1.0),
}


def _no_grad(fn):
    with torch.no_grad():
        fn()


@pytest.mark.filterwarnings("ignore:paramsplit")  # the lr-0 check step overrides region lrs
@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("kind", KINDS + ["rows-deepcopy", "mask-after-step",
                                          "sparse-after-step"])
def test_writes_through_the_weight_land_in_the_parts(kind, write):
    if kind.endswith("-after-step"):  # regions with SGD's own settings, FROZEN: oracle below
        ref = _linear()
        frozen = _plans()["mask"].mask == 2 if kind == "mask-after-step" else \
            ~_plans()["sparse"].mask
        options = {0: {}, 1: {"lr": 0.1}, 2: FROZEN} if kind == "mask-after-step" else \
            {False: {}, True: FROZEN}
        sm, groups = paramsplit.split(ref, {"0.weight": Regions(
            _plans()["mask"].mask if kind == "mask-after-step" else frozen, options)})
        assert kind.split("-")[0] in paramsplit.describe(sm)
        ref = copy.deepcopy(ref)
    else:
        ref, sm, groups = _pair(kind.removesuffix("-deepcopy"))
    if kind == "rows-deepcopy":
        sm = copy.deepcopy(sm)
    if kind.endswith("-after-step"):  # the store was refreshed after the parts changed
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
        for model, opt in ((sm, torch.optim.SGD(groups, lr=0.1)), (ref, opt_ref)):
            model(torch.ones(2, 12)).sum().backward()
            if model is ref:  # the oracle: the frozen region gets no update
                ref[0].weight.grad.masked_fill_(frozen, 0)
            opt.step()
        _assert_same(sm, ref)
    for model in (sm, ref):
        torch.manual_seed(7)
        WRITES[write](model[0])
    _assert_same(sm, ref)
    # ... and the parts hold it: after an optimizer step (lr 0) the weight is read from them
    opt = torch.optim.SGD(paramsplit.param_groups(sm), lr=0.0)
    for g in opt.param_groups:
        g["lr"] = 0.0
    sm(torch.ones(1, 12)).sum().backward()
    opt.step()
    _assert_same(sm, ref)


def _change(kind_of_change, sm, groups, x):
    """Change the parts of ``sm[0].weight`` behind the owner's back (the reads are cached)."""
    part = next(p for n, p in sm[0].named_parameters(recurse=False)
                if n.startswith("weight__") and p.requires_grad)
    if kind_of_change == "in-place":
        with torch.no_grad():
            part.add_(1.0)
    elif kind_of_change == "data":  # new memory, no version bump
        part.data = part.data + 1.0
    elif kind_of_change == "requires_grad":
        for p in sm[0].parameters(recurse=False):
            p.requires_grad_(False)
    elif kind_of_change == "fused step":  # bumps no version counter
        opt = torch.optim.AdamW(groups, lr=0.1, fused=True)
        sm(x).square().sum().backward()
        opt.step()
    elif kind_of_change == "replaced":  # as FSDP2 does: straight into _parameters
        name = next(n for n, p in sm[0]._parameters.items() if p is part)
        sm[0]._parameters[name] = nn.Parameter(part.detach() + 1.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("change", ["in-place", "data", "requires_grad", "fused step",
                                    "replaced"])
def test_no_grad_reads_see_every_change_to_the_parts(kind, change):
    """Outside grad mode a read returns the same cached tensor while nothing changed; any
    change to the parts must reach the next read. Oracle: the grad-mode read, which always
    syncs, and the unsplit layer with that weight."""
    _, sm, groups = _pair(kind)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = sm[0].weight
        assert sm[0].weight is first  # the cached read
        before = first.clone()
    _change(change, sm, groups, x)
    with torch.no_grad():
        got = sm[0].weight.clone()
        got_requires_grad = sm[0].weight.requires_grad
        out = sm(x)
    with torch.enable_grad():  # after the no-grad read: it syncs whatever that one missed
        want = sm[0].weight.detach().clone()
    assert torch.equal(got, want)
    assert got_requires_grad == any(p.requires_grad for n, p in sm[0].named_parameters()
                                    if n.startswith("weight__"))
    with torch.no_grad():
        assert torch.equal(out, sm[2](torch.tanh(nn.functional.linear(x, want, sm[0].bias))))
    if change != "requires_grad":
        assert not torch.equal(want, before)


def test_no_grad_read_follows_requires_grad_of_an_all_frozen_weight():
    """All regions FROZEN: the tensor carries the parameter's own flag (kernels pick their path
    by it), so toggling it must reach a cached no-grad read."""
    sm, _ = paramsplit.split(nn.Linear(4, 6), {"weight": cols({(0, 2): FROZEN,
                                                               (2, None): FROZEN})})
    with torch.no_grad():
        assert sm.weight.requires_grad
        sm.weight.requires_grad_(False)
        assert not sm.weight.requires_grad
        sm.weight.requires_grad_(True)
        assert sm.weight.requires_grad


def test_functional_call_stands_in_for_a_cached_read():
    _, sm, _ = _pair("mask")
    x = torch.randn(4, 12)
    with torch.no_grad():
        w = sm[0].weight
        other = torch.randn_like(w)
        got = torch.func.functional_call(sm, {"0.weight": other}, (x,))
        assert torch.equal(got, sm[2](torch.tanh(nn.functional.linear(x, other, sm[0].bias))))
        assert sm[0].weight is w and torch.equal(sm(x), sm[2](torch.tanh(
            nn.functional.linear(x, w, sm[0].bias))))


def test_rows_store_is_the_parts_memory():
    ref, sm, _ = _pair("rows")
    assert sm[0].weight.data_ptr() == sm[0].weight__0.data_ptr()
    dc = copy.deepcopy(sm)
    assert dc[0].weight.data_ptr() == dc[0].weight__0.data_ptr() == dc[0].weight__1.data_ptr() - \
        4 * 12 * 4


def test_two_writers_raise_instead_of_losing_one():
    ref, sm, groups = _pair("cols")
    held = sm[0].weight  # a reference kept across an optimizer step
    opt = torch.optim.SGD(groups, lr=0.1)
    sm(torch.ones(2, 12)).sum().backward()
    opt.step()
    with torch.no_grad():
        held.mul_(2)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        sm(torch.ones(2, 12))


@pytest.mark.parametrize("kind", ["rows", "cols", "mask"])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_embedding_max_norm_trains_bitwise_like_unsplit(kind, opt_cls):
    """``max_norm`` renormalises the weight in place during forward: it must reach the parts."""
    torch.manual_seed(0)
    ref = nn.Embedding(20, 6, max_norm=1.0)
    with torch.no_grad():
        ref.weight.mul_(3)
    g = torch.Generator().manual_seed(1)
    frozen = torch.zeros(20, 6, dtype=torch.bool)
    if kind == "rows":
        plan, frozen[:8] = rows({(0, 8): FROZEN}), True
    elif kind == "cols":
        plan, frozen[:, :2] = cols({(0, 2): FROZEN}), True
    else:
        frozen = torch.rand(20, 6, generator=g) < 0.4
        plan = Regions(frozen, {True: FROZEN, False: {}})
    sm, groups = paramsplit.split(ref, {"weight": plan})
    ref = copy.deepcopy(ref)
    ref.weight.register_hook(lambda grad: grad.masked_fill(frozen, 0))  # exact with no decay
    kw = {"lr": 0.1} if opt_cls is torch.optim.SGD else {"lr": 0.1, "weight_decay": 0.0}
    opts = [opt_cls(groups, **kw), opt_cls(ref.parameters(), **kw)]
    for _ in range(4):
        idx = torch.randint(0, 20, (3, 5), generator=g)
        for model, opt in zip((sm, ref), opts):
            opt.zero_grad()
            model(idx).pow(2).sum().backward()
            opt.step()
        assert torch.equal(sm.state_dict()["weight"], ref.weight)
    if opt_cls is torch.optim.SGD:  # frozen elements changed only by the renormalisation
        assert torch.equal(sm.weight[frozen], ref.weight[frozen])


# -- freezing idioms and .grad ------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_requires_grad_false_on_the_model_freezes_like_unsplit(kind):
    ref, sm, groups = _pair(kind)
    trainable = {id(p) for g in groups for p in g["params"]}
    x = torch.randn(3, 12)
    for model in (ref, sm):
        model.requires_grad_(False)
        out = model(x)
        assert not out.requires_grad
        with pytest.raises(RuntimeError, match="does not require grad"):
            out.sum().backward()
    sm.requires_grad_(True)
    sm(x).sum().backward()
    for n, p in sm.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None, n
        else:  # FROZEN regions stay frozen when the model is re-enabled
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad_mode", [True, False])
def test_owner_weight_requires_grad_false_freezes_it(kind, grad_mode):
    ref, sm, groups = _pair(kind)
    with torch.set_grad_enabled(grad_mode):
        sm[0].weight.requires_grad_(False)
        ref[0].weight.requires_grad_(False)
    assert not sm[0].weight.requires_grad
    assert all(not p.requires_grad for n, p in sm.named_parameters() if n.startswith("0.weight"))
    sm(torch.randn(3, 12)).sum().backward()
    assert sm[0].weight.grad is None and sm[0].bias.grad is not None
    assert paramsplit.param_groups(sm) != groups
    sm[0].weight.requires_grad = True  # unfreezes the trainable regions only
    assert sm[0].weight.requires_grad
    assert [[id(p) for p in g["params"]] for g in paramsplit.param_groups(sm)] == \
        [[id(p) for p in g["params"]] for g in groups]


@pytest.mark.parametrize("kind", KINDS)
def test_owner_weight_grad_is_the_gradient_in_the_original_layout(kind):
    ref, sm, _ = _pair(kind)
    x = torch.randn(5, 12)
    sm(x).square().sum().backward()
    ref(x).square().sum().backward()
    want = ref[0].weight.grad
    frozen = {"rows": torch.arange(9)[:, None].expand(9, 12) >= 4,
              "mask": _plans()["mask"].mask == 2, "sparse": ~_plans()["sparse"].mask}.get(kind)
    if frozen is not None:
        want = want.masked_fill(frozen, 0)
    assert torch.equal(sm[0].weight.grad, want)
    sm[0].weight.grad = None
    assert all(p.grad is None for n, p in sm.named_parameters() if n.startswith("0.weight"))


# -- torch.func ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_functional_call_grad_vmap_jacrev_with_original_names(kind):
    from torch.func import functional_call, grad, jacrev, vmap

    ref, sm, _ = _pair(kind)
    params = {k: v.detach() * 1.5 for k, v in ref.named_parameters()}
    x = torch.randn(4, 12)
    assert torch.equal(functional_call(sm, params, (x,)), functional_call(ref, params, (x,)))
    assert torch.equal(sm(x), ref(x))  # restored afterwards

    def loss(model):
        return lambda p, x: functional_call(model, p, (x,)).square().sum()

    g_sm, g_ref = grad(loss(sm))(params, x), grad(loss(ref))(params, x)
    assert g_sm.keys() == g_ref.keys()
    for k in g_ref:
        assert torch.allclose(g_sm[k], g_ref[k], rtol=0, atol=1e-6), k
    per_sample = vmap(lambda xi: functional_call(sm, params, (xi[None],)))(x)
    torch.testing.assert_close(per_sample[:, 0], functional_call(ref, params, (x,)))
    j_sm = jacrev(lambda w: functional_call(sm, {**params, "0.weight": w}, (x,)))(
        params["0.weight"])
    j_ref = jacrev(lambda w: functional_call(ref, {**params, "0.weight": w}, (x,)))(
        params["0.weight"])
    torch.testing.assert_close(j_sm, j_ref)


@pytest.mark.parametrize("kind", ["rows", "mask"])
def test_torch_func_over_the_parts(kind):
    """Transforms over ``named_parameters()`` (the parts) work too: assembly is plain ops."""
    from torch.func import functional_call, grad

    ref, sm, _ = _pair(kind)
    params = {k: v.detach() for k, v in sm.named_parameters()}
    x = torch.randn(4, 12)
    g = grad(lambda p: functional_call(sm, p, (x,)).square().sum())(params)
    sm(x).square().sum().backward()
    for k, p in sm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g[k], p.grad)


def test_assigning_a_parameter_raises_with_the_remedy():
    ref, sm, _ = _pair("cols")
    with pytest.raises(AttributeError, match="paramsplit.merge"):
        sm[0].weight = nn.Parameter(torch.zeros(9, 12))
    with pytest.raises(AttributeError, match="split by paramsplit"):
        sm[0].weight = torch.zeros(9, 12)
    sm[0].weight = sm[0].weight  # the split tensor itself: a no-op (e.g. tie_weights)
    _assert_same(sm, ref)


# -- pickling and deepcopy ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["torch.save", "deepcopy", "pickle"])
def test_whole_model_pickles_and_copies_into_a_working_split_model(kind, how):
    ref, sm, _ = _pair(kind)
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(sm, buf)
        buf.seek(0)
        got = torch.load(buf, weights_only=False)
    elif how == "pickle":
        got = pickle.loads(pickle.dumps(sm))
    else:
        got = copy.deepcopy(sm)
    assert type(got[0]).__name__ == "Linear" and isinstance(got[0], nn.Linear)
    _assert_same(got, ref)
    if kind == "rows":  # still zero-copy
        assert got[0].weight.data_ptr() == got[0].weight__0.data_ptr()
    # it trains like the original split model
    groups = paramsplit.param_groups(got)
    opts = [torch.optim.AdamW(groups, lr=0.1), torch.optim.AdamW(paramsplit.param_groups(sm),
                                                                  lr=0.1)]
    x = torch.randn(3, 12)
    for model, opt in zip((got, sm), opts):
        for _ in range(2):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    assert torch.equal(got.state_dict()["0.weight"], sm.state_dict()["0.weight"])
    with torch.no_grad():
        got[0].weight.mul_(0)
    assert sm.state_dict()["0.weight"].abs().sum() > 0  # the copy is independent


# -- optimizers not built from the groups -------------------------------------------------------

def test_optimizer_not_built_from_the_groups_warns_naming_the_parts():
    ref, sm, groups = _pair("mask")
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)
    sm(torch.randn(2, 12)).sum().backward()
    with pytest.warns(UserWarning, match=r"0\.weight__1 \(region 1: weight_decay=0\.2\)"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once per optimizer
        good = torch.optim.AdamW(groups, lr=1e-3)
        good.step()
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1).step()


# -- RNNs: weights cached by their owner --------------------------------------------------------

@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("kind", ["rows", "cols", "mask"])
def test_rnn_split_trains_merges_and_copies(cls, kind):
    torch.manual_seed(0)
    ref = cls(6, 4, num_layers=2, batch_first=True)
    shape = tuple(ref.weight_ih_l0.shape)
    frozen = torch.zeros(shape, dtype=torch.bool)
    if kind == "rows":
        plan, frozen[:4] = rows({(0, 4): FROZEN}), True
    elif kind == "cols":
        plan, frozen[:, :2] = cols({(0, 2): FROZEN}), True
    else:
        frozen = torch.rand(shape, generator=torch.Generator().manual_seed(2)) < 0.5
        plan = Regions(frozen, {True: FROZEN, False: {}})
    sm, groups = paramsplit.split(ref, {"weight_ih_l0": plan})
    ref = copy.deepcopy(ref)
    x = torch.randn(3, 5, 6)
    assert torch.equal(sm(x)[0], ref(x)[0])
    opt = torch.optim.SGD(groups, lr=0.1)
    before = sm.state_dict()["weight_ih_l0"].clone()
    for _ in range(2):
        opt.zero_grad()
        sm(x)[0].sum().backward()
        opt.step()
    after = sm.state_dict()["weight_ih_l0"]
    assert torch.equal(after[frozen], before[frozen]) and (after != before)[~frozen].all()
    merged = paramsplit.merge(sm)
    assert type(merged) is cls
    assert torch.equal(merged(x)[0], sm(x)[0])
    dc = copy.deepcopy(sm)
    assert torch.equal(dc(x)[0], sm(x)[0])
