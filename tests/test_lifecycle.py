"""A split model through a training run: checkpoints, optimizer state, merge, ties, compile,
dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, cols, rows


class TiedLM(nn.Module):
    """Embedding tied to the output projection, like GPT-2's wte / lm_head."""

    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 5))


def _parts(weight):
    """The optimizer's parts of a split parameter (internal; used sparingly)."""
    return paramsplit._sync._SPLITS[weight].parts


SAME = {"weight_decay": 0.05}  # equals the optimizer's default: distinct groups, equal settings
SPEC_A = {"0.weight": rows({(0, 4): SAME}), "2": Regions(torch.arange(45).reshape(5, 9) % 2,
                                                         {0: {}, 1: SAME})}
SPEC_B = {"0.weight": Regions(torch.arange(108).reshape(9, 12) % 3, {0: {}, 1: SAME, 2: {}}),
          "2": cols({(0, 3): SAME})}
#: describe's layouts of SPEC_A / SPEC_B, with parts; their regions differ only in
#: weight_decay, so with per_element_decay (the default) every weight is kept whole ("decay")
LAYOUTS_A = {"0.weight": "rows", "2.weight": "mask"}
LAYOUTS_B = {"0.weight": "mask", "2.weight": "cols"}
LAYOUTS = ["parts", "decay"]


def _split(model, spec, layout="parts"):
    """``paramsplit.split`` with parts (per_element_decay=False) or the decay layout."""
    return paramsplit.split(model, spec, per_element_decay=layout == "decay")


def _layouts(model):
    """{parameter name: its layout} from describe's table."""
    return {line.split()[0]: line.split()[-1]
            for line in paramsplit.describe(model).splitlines()[1:]}


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)


def _steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 12, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _assert_same_weights(model, ref):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_resume_is_bitwise(tmp_path, layout):
    split_model, groups = _split(_model(), SPEC_A, layout)
    assert _layouts(split_model) == (LAYOUTS_A if layout == "parts" else
                                     dict.fromkeys(LAYOUTS_A, "decay"))
    opt = _adamw(groups)
    _steps(split_model, opt, 3, seed=1)
    torch.save({"model": split_model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    _steps(split_model, opt, 3, seed=2)

    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed, groups = _split(_model(seed=5), SPEC_A, layout)
    resumed.load_state_dict(ck["model"], strict=True)
    opt2 = _adamw(groups)
    opt2.load_state_dict(ck["opt"])
    _steps(resumed, opt2, 3, seed=2)
    _assert_same_weights(split_model, resumed)


def test_resuming_optimizer_state_of_another_split_raises_at_the_first_step(tmp_path):
    """Parts cut another way (the fingerprints of the parts differ)."""
    split_model, groups = _split(_model(), SPEC_A)
    opt = _adamw(groups)
    _steps(split_model, opt, 1, seed=1)
    saved = opt.state_dict()
    other, other_groups = _split(_model(), {"0.weight": rows({(0, 5): SAME}), "2": SPEC_A["2"]})
    opt2 = _adamw(other_groups)
    opt2.load_state_dict(saved)  # the same number of tensors per group: torch accepts it
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(RuntimeError, match=r"split another way.*'0\.weight'.*merged_optimizer"):
        _steps(other, opt2, 1, seed=1)
    for name, p in other.named_parameters():
        assert torch.equal(p, before[name]), name  # nothing stepped


def test_merged_optimizer_state_is_in_the_original_layout():
    model = _model()
    split_model, groups = paramsplit.split(model, {
        "0.weight": Regions(torch.arange(108).reshape(9, 12) % 2, {0: FROZEN, 1: {}}),
        "2.weight": rows({(0, 2): {"lr": 0.1}})})
    opt = _adamw(groups)
    _steps(split_model, opt, 2, seed=1)
    state = paramsplit.merged_optimizer_state(opt, split_model)
    assert list(state) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for name, p in model.named_parameters():
        assert state[name]["exp_avg"].shape == p.shape
        assert state[name]["exp_avg_sq"].shape == p.shape
        assert float(state[name]["step"]) == 2.0
    frozen = (torch.arange(108).reshape(9, 12) % 2) == 0
    assert torch.all(state["0.weight"]["exp_avg"][frozen] == 0)
    assert torch.all(state["0.weight"]["exp_avg_sq"][~frozen] > 0)
    # rows: the state of rows 0:2 comes from part 0, of rows 2:5 from part 1
    part0, part1 = _parts(model[2].weight)
    assert torch.equal(state["2.weight"]["exp_avg"][:2], opt.state[part0]["exp_avg"])
    assert torch.equal(state["2.weight"]["exp_avg"][2:], opt.state[part1]["exp_avg"])
    # the merged state is a copy: changing it leaves the optimizer alone
    state["2.weight"]["exp_avg"].zero_()
    assert opt.state[part0]["exp_avg"].abs().sum() > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merged_optimizer_state_matches_the_unsplit_optimizer_state(layout):
    """Equal options: the merged moments are the unsplit AdamW's, bitwise, element by element."""
    ref = _model()
    split_model, groups = _split(copy.deepcopy(ref), SPEC_B, layout)
    opt, ref_opt = _adamw(groups), _adamw(ref.parameters())
    _steps(split_model, opt, 3, seed=1)
    _steps(ref, ref_opt, 3, seed=1)
    state = paramsplit.merged_optimizer_state(opt, split_model)
    for name, p in ref.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name][key], ref_opt.state[p][key]), (name, key)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merged_optimizer_state_of_another_models_optimizer_raises(layout):
    model = _model()
    split_model, groups = _split(model, SPEC_A, layout)
    copied = copy.deepcopy(model)
    copy_opt = _adamw(copied.parameters())
    _steps(copied, copy_opt, 1, seed=1)
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        paramsplit.merged_optimizer_state(copy_opt, split_model)
    # the optimizer of the split model itself is fine, before and after a step
    opt = _adamw(groups)
    assert paramsplit.merged_optimizer_state(opt, split_model) == {}
    _steps(split_model, opt, 1, seed=1)
    assert set(paramsplit.merged_optimizer_state(opt, split_model)) == {
        "0.weight", "0.bias", "2.weight", "2.bias"}


def _split_with_state(model, spec, state, layout="parts"):
    """Split ``model`` and give its AdamW the merged optimizer ``state`` of an earlier run."""
    split_model, groups = _split(model, spec, layout)
    opt = _adamw(groups)
    paramsplit.load_merged_optimizer_state(opt, split_model, state)
    return split_model, opt


@pytest.mark.parametrize("layout", LAYOUTS)
def test_switching_to_a_split_mid_training_keeps_adam_moments(layout):
    ref = _model()
    ref_opt = _adamw(ref.parameters())
    _steps(ref, ref_opt, 3, seed=1)

    state = paramsplit.merged_optimizer_state(ref_opt, ref)  # an unsplit run: plain names
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    split_model, opt = _split_with_state(copy.deepcopy(ref), SPEC_A, state, layout)

    _steps(ref, ref_opt, 3, seed=2)
    _steps(split_model, opt, 3, seed=2)
    _assert_same_weights(split_model, ref)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_switching_the_same_model_to_a_split_mid_training_keeps_adam_moments(layout):
    """Not a copy: the model trained unsplit is split in place, with a new optimizer."""
    model = _model()
    ref = copy.deepcopy(model)
    opt, ref_opt = _adamw(model.parameters()), _adamw(ref.parameters())
    _steps(model, opt, 3, seed=1)
    _steps(ref, ref_opt, 3, seed=1)
    state = paramsplit.merged_optimizer_state(opt, model)
    same, new_opt = _split_with_state(model, SPEC_B, state, layout)
    assert same is model
    _steps(ref, ref_opt, 3, seed=2)
    _steps(model, new_opt, 3, seed=2)
    _assert_same_weights(model, ref)


@pytest.mark.parametrize("layout_a, layout_b", [("parts", "parts"), ("decay", "decay"),
                                                ("parts", "decay"), ("decay", "parts")])
def test_resplitting_with_another_spec_carries_values_and_state(layout_a, layout_b):
    ref = _model()
    ref_opt = _adamw(ref.parameters())
    split_a, groups_a = _split(copy.deepcopy(ref), SPEC_A, layout_a)
    opt_a = _adamw(groups_a)
    _steps(ref, ref_opt, 3, seed=1)
    _steps(split_a, opt_a, 3, seed=1)

    state = paramsplit.merged_optimizer_state(opt_a, split_a)
    assert paramsplit.merge(split_a) is split_a
    split_b, opt_b = _split_with_state(split_a, SPEC_B, state, layout_b)  # again: no merge
    assert split_b is split_a
    assert _layouts(split_b) == (LAYOUTS_B if layout_b == "parts" else
                                 dict.fromkeys(LAYOUTS_B, "decay"))
    _steps(ref, ref_opt, 3, seed=2)
    _steps(split_b, opt_b, 3, seed=2)
    _assert_same_weights(split_b, ref)
    # and back to unsplit: the state of the split run loads into a plain optimizer
    state = paramsplit.merged_optimizer_state(opt_b, split_b)
    plain = copy.deepcopy(ref)
    plain_opt = _adamw(plain.parameters())
    paramsplit.load_merged_optimizer_state(plain_opt, plain, state)
    _steps(ref, ref_opt, 2, seed=3)
    _steps(plain, plain_opt, 2, seed=3)
    _assert_same_weights(plain, ref)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merged_optimizer_state_for_sgd_momentum(layout):
    split_model, groups = _split(_model(), SPEC_B, layout)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    _steps(split_model, opt, 2, seed=1)
    state = paramsplit.merged_optimizer_state(opt, split_model)
    assert state["0.weight"]["momentum_buffer"].shape == (9, 12)
    other, groups2 = _split(paramsplit.merge(split_model), SPEC_A, layout)
    opt2 = torch.optim.SGD(groups2, lr=0.1, momentum=0.9)
    paramsplit.load_merged_optimizer_state(opt2, other, state)
    assert torch.equal(paramsplit.merged_optimizer_state(opt2, other)["0.weight"]["momentum_buffer"],
                       state["0.weight"]["momentum_buffer"])


def test_merge_returns_the_model_itself_and_keeps_ties():
    model = TiedLM()
    start = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    split_model, groups = paramsplit.split(model, {"emb": rows({(0, 15): FROZEN}),
                                                   "mix": cols({(0, 4): {"lr": 0.1}})})
    opt = _adamw(groups)
    tokens = torch.randint(0, 20, (4, 6))
    for _ in range(2):
        opt.zero_grad()
        split_model(tokens).logsumexp(-1).mean().backward()
        opt.step()
    plain = paramsplit.merge(split_model)
    assert plain is model and split_model is model
    assert all(type(m) in (TiedLM, nn.Embedding, nn.Linear) for m in plain.modules())
    assert plain.head.weight is plain.emb.weight
    assert [n for n, _ in plain.named_parameters()] == names
    assert plain.state_dict().keys() == start.state_dict().keys()
    # the frozen rows did not move, the others did
    assert torch.equal(plain.emb.weight[:15], start.emb.weight[:15])
    assert not torch.equal(plain.emb.weight[15:], start.emb.weight[15:])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tied_parameter_split_keeps_the_tie_and_trains_like_the_unsplit_model(layout):
    model = TiedLM()
    ref = copy.deepcopy(model)
    split_model, groups = _split(model, {"head": rows({(0, 10): SAME})}, layout)
    assert split_model.head.weight is split_model.emb.weight  # still tied
    assert len(_parts(model.emb.weight)) == (2 if layout == "parts" else 0)
    assert set(_layouts(model).values()) == {"rows" if layout == "parts" else "decay"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # the tied weight (the carrier) once, its parts once
    assert sorted(ids) == sorted(map(id, list(model.parameters()) + _parts(model.emb.weight)))
    assert [line.split()[0] for line in paramsplit.describe(model).splitlines()[1:]] == [
        "emb.weight", "emb.weight"]
    tokens = torch.randint(0, 20, (3, 5))
    assert torch.equal(split_model(tokens), ref(tokens))
    opt, ref_opt = _adamw(groups), _adamw(ref.parameters())
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(tokens).logsumexp(-1).mean().backward()  # both uses of the tied weight
            o.step()
    _assert_same_weights(model, ref)
    fresh = TiedLM()
    fresh.load_state_dict(paramsplit.merged_state_dict(split_model), strict=True)
    assert torch.equal(fresh(tokens), model(tokens))


def test_tied_parameter_frozen_rows_stay_frozen_through_both_uses():
    model = TiedLM()
    before = model.emb.weight.detach().clone()
    _, groups = paramsplit.split(model, {"head": rows({(0, 10): FROZEN})})
    opt = _adamw(groups)
    tokens = torch.randint(0, 20, (3, 5))
    for _ in range(3):
        opt.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        opt.step()
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight[:10], before[:10])
    assert (model.emb.weight[10:] != before[10:]).any(dim=1).all()


def _compile_spec():
    return SPEC_B | {"0.bias": {"lr": 0.1}}


def test_torch_compile_fullgraph_forward_and_training_step():
    torch._dynamo.reset()
    model = _model()
    eager = copy.deepcopy(model)
    _, groups = _split(model, _compile_spec())
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randn(6, 12)
    torch.testing.assert_close(compiled(x), eager(x))

    _, eager_groups = _split(eager, _compile_spec())
    opt, eager_opt = _adamw(groups), _adamw(eager_groups)
    for m, o in ((compiled, opt), (eager, eager_opt)):
        for _ in range(2):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(model[0].weight, _model()[0].weight)  # it did train


def test_dtype_and_half_conversions():
    model = _model()
    ref = copy.deepcopy(model)
    split_model, _ = _split(model, SPEC_B)
    x = torch.randn(4, 12)
    for dtype, convert in ((torch.float16, nn.Module.half), (torch.bfloat16, nn.Module.bfloat16),
                           (torch.float64, nn.Module.double)):
        got = convert(copy.deepcopy(split_model))(x.to(dtype))
        want = convert(copy.deepcopy(ref))(x.to(dtype))
        assert got.dtype == dtype and torch.equal(got, want)
    split_model.half()
    assert all(p.dtype == torch.float16 for p in split_model.parameters())
    assert torch.equal(split_model(x.half()), ref.half()(x.half()))
    assert list(split_model.buffers()) == []  # no index buffers to keep out of a conversion


@pytest.mark.parametrize("layout", LAYOUTS)
def test_autocast_bf16_on_cpu_forward_and_training(layout):
    model = _model()
    ref = copy.deepcopy(model)
    split_model, groups = _split(model, SPEC_A, layout)
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = split_model(x), ref(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    opt, ref_opt = _adamw(groups), _adamw(ref.parameters())
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(x).float().pow(2).mean()
            loss.backward()
            o.step()
    assert model[0].weight.dtype == torch.float32
    _assert_same_weights(model, ref)


def test_safetensors_round_trip_of_merged_weights(tmp_path):
    import safetensors.torch as safetensors
    model = _model()
    split_model, groups = _split(model, SPEC_B)
    _steps(split_model, _adamw(groups), 1, seed=1)
    safetensors.save_file(paramsplit.merged_state_dict(split_model), str(tmp_path / "w.safetensors"))
    fresh = _model(seed=3)
    fresh.load_state_dict(safetensors.load_file(str(tmp_path / "w.safetensors")), strict=True)
    x = torch.randn(2, 12)
    assert torch.equal(fresh(x), split_model(x))
    # and an original-format safetensors file loads into a split model
    other, _ = _split(_model(seed=4), SPEC_A)
    paramsplit.load_merged_state_dict(other, safetensors.load_file(str(tmp_path / "w.safetensors")))
    assert torch.equal(other(x), split_model(x))


def test_torch_compile_with_frozen_regions_with_and_without_grad():
    torch._dynamo.reset()
    model = _model()
    ref = copy.deepcopy(model)
    split_model, _ = paramsplit.split(model, {"0.bias": FROZEN, "0.weight": Regions(
        torch.arange(108).reshape(9, 12) % 2, {0: FROZEN, 1: {}})})
    assert not model[0].bias.requires_grad
    compiled = torch.compile(split_model, fullgraph=True)
    x = torch.randn(3, 12)
    torch.testing.assert_close(compiled(x), ref(x))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x))
