"""Tools that walk the model see the original model: EMA code, ``AveragedModel``, meta loading,
``fx``, ``jit``, pruning, Hugging Face tying and resizing, ``inference_mode``; a weight replaced
behind paramsplit's back is taken over or refused at the next step, never stepped stale; the
optimizer checks warn or raise only when true."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import paramsplit as ps
from test_gradients import KINDS, assert_equal_models, batches, loss_fn, make_model, pair, spec_of


def train(model, opt, data, after_step=None):
    for xy in data:
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
        if after_step is not None:
            after_step(model)


@pytest.mark.parametrize("kind", KINDS)
def test_ema_swapping_weights_through_p_data_lands(kind):
    """EMA libraries swap averaged weights in with ``p.data.copy_`` (no version bump) for an
    evaluation, then swap the training weights back; writes between steps must land."""
    model, opt, ref, ref_opt, fix = pair(kind)
    ema = [p.detach().clone() for p in model.parameters()]
    ref_ema = [p.detach().clone() for p in ref.parameters()]
    for xy in batches(4):
        for m, o, avg in ((model, opt, ema), (ref, ref_opt, ref_ema)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
            with torch.no_grad():
                for p, e in zip(m.parameters(), avg):
                    e.lerp_(p, 0.5)
                backup = [p.detach().clone() for p in m.parameters()]
                for p, e in zip(m.parameters(), avg):  # swap in, evaluate, swap back
                    p.data.copy_(e)
                m(xy[0])
                for p, b in zip(m.parameters(), backup):
                    p.data.copy_(b)
                # and a hand-written update through .data between steps
                for p in m.parameters():
                    p.data.mul_(0.999)
        fix()
        assert_equal_models(model, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_averaged_model_with_buffers_of_a_split_model(kind):
    model, opt, ref, ref_opt, fix = pair(kind)
    avg = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    ref_avg = torch.optim.swa_utils.AveragedModel(ref, use_buffers=True)
    for xy in batches(3):
        train(model, opt, [xy])
        train(ref, ref_opt, [xy])
        fix()
        avg.update_parameters(model)
        ref_avg.update_parameters(ref)
    assert_equal_models(avg.module, ref_avg.module)
    assert [n for n, _ in avg.named_buffers()] == [n for n, _ in ref_avg.named_buffers()]


@pytest.mark.parametrize("kind", KINDS)
def test_meta_model_split_then_load_state_dict_assign(kind):
    """Current transformers' loading path: build on meta, split, ``load_state_dict(assign=True)``
    (which replaces every parameter object), then build the optimizer, as with any model, from
    the loaded parameters: ``param_groups(model)`` keeps every plan, whole ones included."""
    _, _, ref, ref_opt, _ = pair(kind)
    with torch.device("meta"):
        model = make_model()
    spec = {**spec_of(kind), "0.bias": {"weight_decay": 0.05}, "2.weight": {}, "2.bias": {}}
    model, groups = ps.split(model, spec)
    model.load_state_dict(ref.state_dict(), assign=True)
    groups = ps.param_groups(model)
    _, fresh = ps.split(make_model(), spec)  # the same plans on a model built the usual way
    assert [(g["name"], [p.shape for p in g["params"]]) for g in groups] == \
        [(g["name"], [p.shape for p in g["params"]]) for g in fresh]
    opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.05, foreach=False)
    for xy in batches(3):
        train(model, opt, [xy])
        train(ref, ref_opt, [xy])
        assert_equal_models(model, ref)
    assert all(p.device.type == "cpu" for g in opt.param_groups for p in g["params"])


@pytest.mark.parametrize("kind", KINDS)
def test_fx_symbolic_trace_of_a_split_model_trains(kind):
    model, opt, ref, ref_opt, fix = pair(kind)
    traced = torch.fx.symbolic_trace(model)
    for xy in batches(3):
        train(traced, opt, [xy])
        train(ref, ref_opt, [xy])
        fix()
        assert_equal_models(model, ref)
        assert_equal_models(traced, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_jit_trace_get_parameter_and_inference_mode(kind):
    model, opt, ref, ref_opt, fix = pair(kind)
    train(model, opt, batches(2))
    train(ref, ref_opt, batches(2))
    fix()
    x = batches(1, seed=5)[0][0]
    traced = torch.jit.trace(model, x)
    assert torch.equal(traced(x), ref(x))
    assert model.get_parameter("0.weight") is model[0].weight
    with torch.inference_mode():
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("kind", KINDS)
def test_prune_after_split_trains_the_pruned_weight(kind):
    """``prune`` moves the weight to ``weight_orig`` (the same tensor) and reads it through a
    mask; ``prune.remove`` puts a new parameter back, which the next step takes over."""
    from torch.nn.utils import prune

    model, opt, ref, ref_opt, fix = pair(kind)
    amount = 3
    prune.l1_unstructured(model[0], "weight", amount=amount)
    prune.l1_unstructured(ref[0], "weight", amount=amount)
    for xy in batches(3):
        train(model, opt, [xy])
        train(ref, ref_opt, [xy])
        fix()
        assert torch.equal(model[0].weight, ref[0].weight)
    prune.remove(model[0], "weight")
    prune.remove(ref[0], "weight")
    for xy in batches(2, seed=3):
        train(model, opt, [xy])
        train(ref, ref_opt, [xy])
        fix()
        assert_equal_models(model, ref)


def test_prune_before_split_splits_weight_orig():
    from torch.nn.utils import prune

    model, ref = make_model(), make_model()  # deepcopy of a pruned model fails in torch
    for m in (model, ref):
        torch.manual_seed(3)
        prune.random_unstructured(m[0], "weight", amount=0.3)
    model, groups = ps.split(model, {"0.weight_orig": ps.rows({(0, 4): {"weight_decay": 0.05},
                                                                (4, None): {}})})
    opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.05, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.05, foreach=False)
    for xy in batches(3):
        train(model, opt, [xy])
        train(ref, ref_opt, [xy])
        assert_equal_models(model, ref)


@pytest.mark.parametrize("kind", ["rows", "cols", "mask"])
@pytest.mark.parametrize("how", ["data", "to_empty", "to_dtype"])
def test_weight_storage_replaced_after_split_is_taken_over(kind, how):
    model, opt, ref, ref_opt, fix = pair(kind)
    train(model, opt, batches(1))
    train(ref, ref_opt, batches(1))
    fix()
    values = copy.deepcopy(ref.state_dict())
    for m in (model, ref):
        if how == "data":
            m[0].weight.data = m[0].weight.detach().clone() * 0.5
        elif how == "to_empty":
            m.to_empty(device="cpu")
            m.load_state_dict(values)
        else:
            m.double()
    for o in (opt, ref_opt):
        if how == "to_dtype":  # as for an unsplit model: the optimizer state follows by hand
            for state in o.state.values():
                for k, v in state.items():
                    if torch.is_tensor(v) and v.is_floating_point() and v.dim():
                        state[k] = v.double()
    data = [(x.to(m[0].weight.dtype), y.to(m[0].weight.dtype)) for x, y in batches(2, seed=4)]
    for xy in data:
        train(model, opt, [xy])
        train(ref, ref_opt, [xy])
        fix()
        assert_equal_models(model, ref)


def test_replaced_by_another_shape_raises_naming_the_parameter_and_the_remedy():
    model, opt, _, _, _ = pair("mask")
    train(model, opt, batches(1))
    model[0] = nn.Linear(12, 9)  # same shape: taken over
    train(model, opt, batches(1))
    model[0], model[2] = nn.Linear(12, 10), nn.Linear(10, 3)
    with pytest.raises(RuntimeError, match=r"paramsplit: parameter '0.weight' was replaced .*"
                                           r"shape \(10, 12\).*paramsplit.split"):
        train(model, opt, batches(1))


def test_hf_tie_weights_and_resize_token_embeddings_after_split():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model, groups = ps.split(model, {"transformer.wte": ps.rows({(0, 60): ps.FROZEN})})
    opt = torch.optim.AdamW(groups, lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    before = model.transformer.wte.weight[:60].detach().clone()

    def step():
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()

    step()
    model.tie_weights()  # ties what is tied already: nothing changes
    step()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight[:60], before)
    model.resize_token_embeddings(70)
    with pytest.raises(RuntimeError, match=r"transformer.wte.weight.*shape \(70, 32\)"):
        step()


def test_warning_only_for_an_optimizer_not_built_from_the_groups():
    model, _, _, _, _ = pair("cols")
    groups = ps.param_groups(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = torch.optim.AdamW(groups, lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 * (s + 1))  # warmup
        train(model, opt, batches(2), after_step=lambda m: sched.step())
        # regrouping the groups' tensors by ndim within one optimizer is legitimate
        params = [p for g in ps.param_groups(model) for p in g["params"]]
        regrouped = torch.optim.AdamW([{"params": [p for p in params if p.dim() == 2]},
                                       {"params": [p for p in params if p.dim() < 2],
                                        "weight_decay": 0.0}], lr=0.05)
        train(model, regrouped, batches(2))
    plain = torch.optim.AdamW(model.parameters(), lr=0.05)
    with pytest.warns(UserWarning,
                      match="paramsplit: this optimizer steps '0.weight' as a whole tensor"):
        train(model, plain, batches(1))


def test_parts_without_their_weight_in_the_optimizer_raise():
    model, _, _, _, _ = pair("mask")
    split = ps._sync._SPLITS[model[0].weight]
    opt = torch.optim.AdamW(split.parts, lr=0.05)
    with pytest.raises(RuntimeError, match="steps parts of '0.weight' but does not hold"):
        train(model, opt, batches(1))


def test_optimizer_state_of_another_layout_is_refused_at_the_first_step():
    model, opt, _, _, _ = pair("mask")
    train(model, opt, batches(1))
    saved = opt.state_dict()
    other = make_model()
    mask = torch.rand(9, 12, generator=torch.Generator().manual_seed(7)) > 0.5
    other, groups = ps.split(other, {"0": ps.Regions(mask, {True: {"lr": 0.05}, False: {}})})
    opt2 = torch.optim.AdamW(groups, lr=0.05)
    opt2.load_state_dict(saved)  # same counts and shapes: torch cannot tell
    with pytest.raises(RuntimeError, match="saved .* for parameters split another way"):
        train(other, opt2, batches(1))


def test_optimizer_state_of_the_unsplit_model_is_refused_by_its_shapes():
    """State saved by an optimizer over the unsplit model carries no fingerprints; where its
    shapes do not fit the parts, the first step names paramsplit, the parameter and the remedy
    (it was torch's broadcasting error inside AdamW)."""
    plain = make_model()
    opt = torch.optim.AdamW(plain.parameters(), lr=0.05)
    train(plain, opt, batches(1))
    model, groups = ps.split(make_model(), {"0": ps.rows({(0, 4): {"lr": 0.01}, (4, 9): {}})},
                             per_element_decay=False)
    new = torch.optim.AdamW([{"params": [p for g in groups for p in g["params"]]}], lr=0.05)
    new.load_state_dict({"state": opt.state_dict()["state"],
                         "param_groups": [{**opt.state_dict()["param_groups"][0],
                                           "params": list(range(len(new.param_groups[0]
                                                                    ["params"])))}]})
    with pytest.raises(RuntimeError, match=r"paramsplit: the optimizer's state 'exp_avg' of a "
                                           r"part of '0.weight' has shape .*merged_optimizer_st"):
        train(model, new, batches(1))


@pytest.mark.parametrize("make", [
    lambda g: torch.optim.Adafactor(g, lr=0.01),
    lambda g: torch.optim.Muon([{**group, "params": [q for q in group["params"] if q.dim() == 2]}
                                for group in g if any(q.dim() == 2 for q in group["params"])],
                               lr=0.01),  # Muon takes 2-D tensors only: regrouped by ndim
], ids=["Adafactor", "Muon"])
def test_per_tensor_optimizers_stepping_parts_warn_naming_them(make):
    model, _, _, _, _ = pair("rows")
    opt = make(ps.param_groups(model))
    with pytest.warns(UserWarning, match=rf"paramsplit: {type(opt).__name__} computes statistics "
                                         r"of each whole tensor.*'0.weight'"):
        train(model, opt, batches(1))
    model, _, _, _, _ = pair("decay")  # per-element weight_decay keeps the tensor whole: silent
    opt = make(ps.param_groups(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, batches(1))


class _Centralised(torch.optim.Optimizer):
    """A hand-written SGD that centralises each tensor's gradient (subtracts its mean): a
    statistic of the whole tensor, as Ranger and pytorch_optimizer's ``use_gc`` do."""

    def __init__(self, params, lr=0.05):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad - p.grad.mean(), alpha=-group["lr"])


def test_an_optimizer_paramsplit_does_not_know_warns_that_it_may_differ():
    """paramsplit cannot tell an unknown optimizer's math: stepping parts, it warns that the
    optimizer may compute whole-tensor statistics (this one does, and differs); a subclass of an
    element-wise torch optimizer is known, and silent."""
    model, _, _, _, _ = pair("rows")
    with pytest.warns(UserWarning, match=r"paramsplit does not know whether _Centralised "
                                         r"updates each element .*'0.weight'"):
        train(model, _Centralised(ps.param_groups(model)), batches(1))

    class MyAdamW(torch.optim.AdamW):
        pass

    model, _, _, _, _ = pair("rows")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, MyAdamW(ps.param_groups(model), lr=0.05), batches(1))


def test_param_groups_of_a_copy_of_a_split_model_raise():
    """A deepcopy of a split model is a plain model: its param groups would train the planned
    FROZEN rows, so ``param_groups`` refuses it, naming the remedy; a model split with an empty
    spec is still a model given to split."""
    model, _, _, _, _ = pair("rows")
    with pytest.raises(ValueError, match=r"paramsplit.param_groups: no parameter .* split the "
                                         r"copy"):
        ps.param_groups(copy.deepcopy(model))
    plain, _ = ps.split(make_model(), {})
    assert [g["name"] for g in ps.param_groups(plain)] == ["default"]


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickled_or_copied_groups_raise_instead_of_stepping_whole_weights(how):
    """A ddp_spawn worker gets a pickled copy of the groups: its parts are plain tensors that
    nothing syncs with the weight."""
    import pickle

    model, _, _, _, _ = pair("mask")
    groups = ps.param_groups(model)
    if how == "pickle":
        model, groups = pickle.loads(pickle.dumps((model, groups)))
    else:
        model, groups = copy.deepcopy((model, groups))
    opt = torch.optim.AdamW(groups, lr=0.05)
    before = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="groups were pickled or copied"):
        train(model, opt, batches(1))
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("kind", KINDS)
def test_dcp_optimizer_state_initialisation_step_is_silent_and_moves_nothing(kind):
    """torch.distributed.checkpoint initialises optimizer state with an lr=0 step on zero
    gradients: no paramsplit warning, no weight moves, the parts get their state."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model, opt, _, _, _ = pair(kind)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _init_optim_state(opt)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    split = ps._sync._SPLITS[model[0].weight]
    assert all(part in opt.state for part in split.parts)
    assert all(p.grad is None for p in model.parameters())


def test_a_decay_weight_resized_in_place_raises_naming_it():
    """Hugging Face's resize_token_embeddings keeps the parameter and changes its .data: the
    per-element decay planned for the old rows must not silently skip the new ones."""
    model = nn.Sequential(nn.Embedding(10, 4))
    model, groups = ps.split(model, {"0": ps.rows({(0, 5): {"weight_decay": 0.1}})})
    opt = torch.optim.AdamW(groups, lr=0.01)
    model[0].weight.data = torch.randn(12, 4)
    model(torch.tensor([1, 11])).sum().backward()
    with pytest.raises(RuntimeError, match=r"'0.weight' has shape \(12, 4\) now, \(10, 4\)"):
        opt.step()


@pytest.mark.parametrize("replaced", ["0", "2"])
@pytest.mark.parametrize("kind", ["rows", "cols", "mask"])
def test_a_step_refused_for_one_weight_leaves_every_weight_as_it_was(kind, replaced):
    """The hand-over before a step defers its copies and batches them across weights; when a
    weight is refused midway, the weights handed over before it get their values and gradients
    back untouched, and training goes on as the unsplit model once the model is repaired."""
    model, ref = make_model(), make_model()
    second = {"rows": ps.cols({(0, 4): {"lr": 0.05}, (4, None): {}}),
              "cols": ps.rows({(0, 1): {"lr": 0.05}, (1, None): {}})}.get(
        kind, ps.Regions(torch.arange(27).reshape(3, 9) % 2, {0: {"lr": 0.05}, 1: {}}))
    model, groups = ps.split(model, {**spec_of(kind), "2": second})
    opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.05, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.05, foreach=False)
    first, second_batch = batches(2)
    train(model, opt, [first])
    train(ref, ref_opt, [first])
    for p, q in zip(model.parameters(), ref.parameters()):  # EMA-style writes: the parts are stale
        p.data.mul_(0.5)
        q.data.mul_(0.5)
    opt.zero_grad()
    loss_fn(model, second_batch).backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    kept = model[int(replaced)]
    model[int(replaced)] = nn.Linear(12, 10) if replaced == "0" else nn.Linear(10, 3)
    with pytest.raises(RuntimeError, match=rf"paramsplit: parameter '{replaced}.weight' was "
                                           r"replaced"):
        opt.step()
    model[int(replaced)] = kept
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and torch.equal(p.grad, before[n][1]), n
    opt.step()
    train(ref, ref_opt, [second_batch])
    assert_equal_models(model, ref)


@pytest.mark.parametrize("plan, says, not_says", [
    (ps.rows({(0, 3): ps.FROZEN, (3, None): {"lr": 0.01}}), "training its FROZEN elements",
     "per-element weight_decay"),
    (ps.Regions(torch.arange(108).reshape(9, 12) % 2, {0: {"weight_decay": 0.1}, 1: {}}),
     "for per-element weight_decay: outside a group named 'per-element weight_decay'", "FROZEN"),
])
def test_the_not_built_from_the_groups_warning_names_what_is_ignored(plan, says, not_says):
    model, _ = ps.split(make_model(), {"0": plan})
    with pytest.warns(UserWarning, match="not built from paramsplit's groups") as record:
        train(model, torch.optim.AdamW(model.parameters(), lr=0.05), batches(1))
    (message,) = [str(w.message) for w in record if "paramsplit" in str(w.message)]
    assert says in message and not_says not in message
    assert "'0.weight' as a whole tensor" in message and "paramsplit.param_groups(model)" in message


# -- refusals and failures around a step leave every weight as it was (an adversarial review) ---

def _two_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))


def _state(model):
    return {n: (p.detach().clone(), None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()}


def _assert_state(model, before):
    for n, p in model.named_parameters():
        value, grad = before[n]
        assert torch.equal(p.detach().to(value.dtype), value), n
        assert (p.grad is None) == (grad is None) and (grad is None or torch.equal(p.grad, grad)), n


@pytest.mark.parametrize("plan", ["decay", "cols"])
def test_a_step_refused_after_a_decay_weight_leaves_it_undecayed(plan):
    """Per-element decay changes a weight before the step (decoupled decay): it runs only once
    every weight of the step passed its checks, so a refusal leaves it as it was."""
    model = _two_layers()
    later = (torch.where(torch.rand(4, 5) < .5, 0.0, 0.5) if plan == "decay" else
             ps.cols({(0, 2): {"lr": 0.1}, (2, None): {}}))
    _, groups = ps.split(model, {"0.weight": torch.where(torch.rand(5, 6) < .5, 0.0, 0.5),
                                 "1.weight": later})
    opt = torch.optim.AdamW(groups, lr=0.1)
    model(torch.randn(2, 6)).sum().backward()
    before, kept = _state(model), model[1].weight
    model[1].weight = nn.Parameter(torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="paramsplit: parameter '1.weight' was replaced"):
        opt.step()
    model[1].weight = kept
    _assert_state(model, before)
    assert not opt.state


def test_a_failing_copy_before_the_step_leaves_every_gradient_in_place(monkeypatch):
    """The copies of all weights are made together after every check; if they fail (an
    interrupt), the weights keep their gradients and the parts hold none, and the step can be
    taken again."""
    model, ref = _two_layers(), _two_layers()
    spec = {"0.weight": ps.cols({(0, 3): {"lr": .1}, (3, 6): {"lr": .2}}),
            "1.weight": ps.cols({(0, 1): {"lr": .1}, (1, 5): {"lr": .2}})}
    _, groups = ps.split(model, spec)
    _, ref_groups = ps.split(ref, spec)
    opt, ref_opt = torch.optim.SGD(groups, lr=0.1), torch.optim.SGD(ref_groups, lr=0.1)
    x = torch.randn(2, 6)
    for m in (model, ref):
        m(x).sum().backward()
    before = _state(model)
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda d, s: (_ for _ in ()).throw(
        KeyboardInterrupt("a copy interrupted")))
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    monkeypatch.setattr(torch, "_foreach_copy_", real)
    _assert_state(model, before)
    assert all(p.grad is None for s in map(ps._sync._SPLITS.get, (model[0].weight, model[1].weight))
               for p in s.parts)
    opt.step()
    ref_opt.step()
    assert_equal_models(model, ref)


def test_a_weight_failing_after_the_step_does_not_keep_the_others_from_their_values(monkeypatch):
    """After the step every weight takes its parts' values, even when one of them fails to take
    its gradient back; the error is raised after."""
    model = _two_layers()
    spec = {"0.weight": ps.cols({(0, 3): {"lr": .1}, (3, 6): {"lr": .2}}),
            "1.weight": ps.cols({(0, 1): {"lr": .1}, (1, 5): {"lr": .2}})}
    _, groups = ps.split(model, spec)
    opt = torch.optim.SGD(groups, lr=0.1)
    model(torch.randn(2, 6)).sum().backward()
    first = ps._sync._SPLITS[model[0].weight]
    real = type(first).after_step

    def failing(self, copies):
        real(self, copies)
        if self is first:
            raise RuntimeError("a failure after the step")

    monkeypatch.setattr(type(first), "after_step", failing)
    w0, w1 = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    with pytest.raises(RuntimeError, match="a failure after the step"):
        opt.step()
    assert not torch.equal(model[0].weight, w0) and not torch.equal(model[1].weight, w1)
    for split in (first, ps._sync._SPLITS[model[1].weight]):
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in split.parts]),
                           torch.cat([split.layout.pieces(split.weight.detach())[i].reshape(-1)
                                      for i in range(len(split.parts))]))


@pytest.mark.parametrize("kind", ["rows", "cols"])
def test_block_gradients_keep_their_dtype(kind):
    """A bf16 weight whose gradient is float32 (``Tensor.grad_dtype``): the parts' gradients are
    cut from it without a cast, so torch refuses them as it refuses any float32 gradient for a
    bf16 tensor, before anything changes; never a step on rounded gradients."""
    model = _two_layers().to(torch.bfloat16)
    for p in model.parameters():
        p.grad_dtype = torch.float32
    plan = (ps.rows({(0, 2): {}, (2, None): {"lr": 0.2}}) if kind == "rows" else
            ps.cols({(0, 3): {}, (3, None): {"lr": 0.2}}))
    _, groups = ps.split(model, {"0.weight": plan}, per_element_decay=False)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    model(torch.randn(2, 6).to(torch.bfloat16)).float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32
    before = _state(model)
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()
    _assert_state(model, before)
    assert not opt.state


def test_rows_of_a_weight_stored_transposed_step_rightly_with_fused_adamw():
    """Row blocks of a non-contiguous weight would be strided views, which fused kernels step
    wrongly: they are copied in and out around the step instead."""
    torch.manual_seed(0)
    ref = nn.Linear(6, 5)
    ref.weight = nn.Parameter(torch.randn(6, 5).t())
    model = copy.deepcopy(ref)
    _, groups = ps.split(model, {"weight": ps.rows({(0, 2): {}, (2, None): {}})},
                         per_element_decay=False)
    assert all(p.is_contiguous() for p in ps._sync._SPLITS[model.weight].parts)
    opt = torch.optim.AdamW(groups, lr=0.01, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, fused=True)
    for _ in range(3):
        x = torch.randn(4, 6)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(model.weight, ref.weight, rtol=0, atol=1e-6)


# -- hooks of the optimizer's own see the weights as the model has them --------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_optimizer_step_hooks_see_the_model_s_weights_and_gradients(kind):
    """An EMA updated from the optimizer's own post-step hook (ema_pytorch's
    ``add_to_optimizer_post_step_hook``, code written that way) and gradient clipping in its own
    pre-step hook: paramsplit hands over after every pre hook of the optimizer's and back before
    every post hook, so both see the weights and gradients the model has; bitwise the unsplit
    run with the same hooks, whichever was registered first."""
    model, opt, ref, ref_opt, fix = pair(kind)
    emas = []
    for m, o in ((model, opt), (ref, ref_opt)):
        ema = [p.detach().clone() for p in m.parameters()]
        emas.append(ema)
        o.register_step_pre_hook(
            lambda o, a, k, m=m: [torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)] and None)

        def update(o, a, k, m=m, ema=ema):
            with torch.no_grad():
                for e, p in zip(ema, m.parameters()):
                    e.lerp_(p, 0.5)

        o.register_step_post_hook(update)
    for xy in batches(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
        fix()
        assert_equal_models(model, ref)
        for e, r in zip(*emas):
            assert torch.equal(e, r)


def test_the_optimizer_s_own_hook_dicts_are_where_paramsplit_orders_them():
    """Pins the private structure paramsplit reorders: an optimizer's own step hooks live in
    ``_optimizer_step_pre_hooks`` / ``_optimizer_step_post_hooks``, ordered dicts keyed by the
    handles' ids, run in order."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    calls = []
    handles = [opt.register_step_pre_hook(lambda o, a, k, i=i: calls.append(i)) for i in (1, 2)]
    pre = opt._optimizer_step_pre_hooks
    assert list(pre) == [h.id for h in handles]
    pre[handles[0].id] = pre.pop(handles[0].id)
    opt.step()
    assert calls == [2, 1]
    assert isinstance(opt._optimizer_step_post_hooks, dict)
