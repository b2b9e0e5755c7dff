"""A split model through a training run: checkpoints, optimizer state, merge, compile, dtypes."""

from __future__ import annotations

import copy

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


SAME = {"weight_decay": 0.05}  # equals the optimizer's default: distinct groups, equal settings
SPEC_A = {"0.weight": rows({(0, 4): SAME}), "2": Regions(torch.arange(45).reshape(5, 9) % 2,
                                                         {0: {}, 1: SAME})}
SPEC_B = {"0.weight": Regions(torch.arange(108).reshape(9, 12) % 3, {0: {}, 1: SAME, 2: {}}),
          "2": cols({(0, 3): SAME})}


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)


def _steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 12, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _assert_same_weights(split_model, ref):
    merged = paramsplit.merged_state_dict(split_model)
    for k, v in ref.state_dict().items():
        assert torch.equal(merged[k], v), k


def test_checkpoint_resume_is_bitwise(tmp_path):
    split_model, groups = paramsplit.split(_model(), SPEC_A)
    opt = _adamw(groups)
    _steps(split_model, opt, 3, seed=1)
    torch.save({"model": split_model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    _steps(split_model, opt, 3, seed=2)

    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed, groups = paramsplit.split(_model(seed=5), SPEC_A)
    resumed.load_state_dict(ck["model"], strict=True)
    opt2 = _adamw(groups)
    opt2.load_state_dict(ck["opt"])
    _steps(resumed, opt2, 3, seed=2)
    for (n, a), b in zip(split_model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


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
    assert torch.equal(state["2.weight"]["exp_avg"][:2], opt.state[split_model[2].weight__0]["exp_avg"])
    assert torch.equal(state["2.weight"]["exp_avg"][2:], opt.state[split_model[2].weight__1]["exp_avg"])


def _split_with_state(model, spec, state):
    """Split ``model`` and give its AdamW the merged optimizer ``state`` of an earlier run."""
    split_model, groups = paramsplit.split(model, spec)
    opt = _adamw(groups)
    paramsplit.load_merged_optimizer_state(opt, split_model, state)
    return split_model, opt


def test_switching_to_a_split_mid_training_keeps_adam_moments():
    ref = _model()
    ref_opt = _adamw(ref.parameters())
    _steps(ref, ref_opt, 3, seed=1)

    state = paramsplit.merged_optimizer_state(ref_opt, ref)  # an unsplit run: plain names
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    split_model, opt = _split_with_state(copy.deepcopy(ref), SPEC_A, state)

    _steps(ref, ref_opt, 3, seed=2)
    _steps(split_model, opt, 3, seed=2)
    _assert_same_weights(split_model, ref)


def test_resplitting_with_another_spec_carries_values_and_state():
    ref = _model()
    ref_opt = _adamw(ref.parameters())
    split_a, groups_a = paramsplit.split(copy.deepcopy(ref), SPEC_A)
    opt_a = _adamw(groups_a)
    _steps(ref, ref_opt, 3, seed=1)
    _steps(split_a, opt_a, 3, seed=1)

    state = paramsplit.merged_optimizer_state(opt_a, split_a)
    split_b, opt_b = _split_with_state(paramsplit.merge(split_a), SPEC_B, state)
    _steps(ref, ref_opt, 3, seed=2)
    _steps(split_b, opt_b, 3, seed=2)
    _assert_same_weights(split_b, ref)


def test_merged_optimizer_state_for_sgd_momentum():
    split_model, groups = paramsplit.split(_model(), SPEC_B)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    _steps(split_model, opt, 2, seed=1)
    state = paramsplit.merged_optimizer_state(opt, split_model)
    assert state["0.weight"]["momentum_buffer"].shape == (9, 12)
    other, groups2 = paramsplit.split(paramsplit.merge(split_model), SPEC_A)
    opt2 = torch.optim.SGD(groups2, lr=0.1, momentum=0.9)
    paramsplit.load_merged_optimizer_state(opt2, other, state)
    assert torch.equal(paramsplit.merged_optimizer_state(opt2, other)["0.weight"]["momentum_buffer"],
                       state["0.weight"]["momentum_buffer"])


def test_merge_gives_plain_original_classes_and_keeps_ties():
    model = TiedLM()
    split_model, groups = paramsplit.split(model, {"emb": rows({(0, 15): FROZEN}),
                                                   "mix": cols({(0, 4): {"lr": 0.1}})})
    opt = _adamw(groups)
    tokens = torch.randint(0, 20, (4, 6))
    for _ in range(2):
        opt.zero_grad()
        split_model(tokens).logsumexp(-1).mean().backward()
        opt.step()
    plain = paramsplit.merge(split_model)
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]
    assert all(type(m) in (TiedLM, nn.Embedding, nn.Linear) for m in plain.modules())
    assert plain.head.weight is plain.emb.weight
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert torch.equal(plain(tokens), split_model(tokens))
    assert plain.state_dict().keys() == model.state_dict().keys()
    # the frozen rows did not move, the others did
    assert torch.equal(plain.emb.weight[:15], model.emb.weight[:15])
    assert not torch.equal(plain.emb.weight[15:], model.emb.weight[15:])


def test_tied_parameter_split_keeps_the_tie():
    model = TiedLM()
    split_model, groups = paramsplit.split(model, {"head": rows({(0, 10): {"lr": 0.0}})})
    assert split_model.head.weight__0 is split_model.emb.weight__0
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    tokens = torch.randint(0, 20, (3, 5))
    assert torch.equal(split_model(tokens), model(tokens))
    merged = paramsplit.merged_state_dict(split_model)
    assert merged.keys() == model.state_dict().keys()
    fresh = TiedLM()
    fresh.load_state_dict(merged, strict=True)
    assert torch.equal(fresh(tokens), model(tokens))
    assert "emb.weight" in paramsplit.describe(split_model)


def test_torch_compile_fullgraph_forward_and_training_step():
    torch._dynamo.reset()
    model = _model()
    split_model, groups = paramsplit.split(model, SPEC_B | {"0.bias": {"lr": 0.1}})
    compiled = torch.compile(split_model, fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randn(6, 12)
    torch.testing.assert_close(compiled(x), model(x))

    eager, eager_groups = paramsplit.split(copy.deepcopy(model), SPEC_B | {"0.bias": {"lr": 0.1}})
    opt, eager_opt = _adamw(groups), _adamw(eager_groups)
    for m, o in ((compiled, opt), (eager, eager_opt)):
        for _ in range(2):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for a, b in zip(paramsplit.merged_state_dict(split_model).values(),
                    paramsplit.merged_state_dict(eager).values()):
        torch.testing.assert_close(a, b)


def test_dtype_and_half_conversions():
    model = _model()
    split_model, _ = paramsplit.split(model, SPEC_B)
    x = torch.randn(4, 12)
    for dtype, convert in ((torch.float16, nn.Module.half), (torch.bfloat16, nn.Module.bfloat16),
                           (torch.float64, nn.Module.double)):
        got = convert(copy.deepcopy(split_model))(x.to(dtype))
        want = convert(copy.deepcopy(model))(x.to(dtype))
        assert got.dtype == dtype and torch.equal(got, want)
    moved = copy.deepcopy(split_model).to(torch.float64)
    assert moved[0].weight__perm.dtype == torch.int32  # index buffers are not converted


def test_autocast_bf16_on_cpu():
    model = _model()
    split_model, _ = paramsplit.split(model, SPEC_A)
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = split_model(x), model(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_safetensors_round_trip_of_merged_weights(tmp_path):
    import safetensors.torch as safetensors
    model = _model()
    split_model, _ = paramsplit.split(model, SPEC_B)
    safetensors.save_file(paramsplit.merged_state_dict(split_model), str(tmp_path / "w.safetensors"))
    fresh = _model(seed=3)
    fresh.load_state_dict(safetensors.load_file(str(tmp_path / "w.safetensors")), strict=True)
    x = torch.randn(2, 12)
    assert torch.equal(fresh(x), split_model(x))
    # and an original-format safetensors file loads into a split model
    other, _ = paramsplit.split(_model(seed=4), SPEC_A)
    paramsplit.load_merged_state_dict(other, safetensors.load_file(str(tmp_path / "w.safetensors")))
    assert torch.equal(other(x), split_model(x))


def test_torch_compile_with_frozen_parts_with_and_without_grad():
    torch._dynamo.reset()
    model = _model()
    split_model, _ = paramsplit.split(model, {"0.bias": FROZEN, "0.weight": Regions(
        torch.arange(108).reshape(9, 12) % 2, {0: FROZEN, 1: {}})})
    compiled = torch.compile(split_model, fullgraph=True)
    x = torch.randn(3, 12)
    torch.testing.assert_close(compiled(x), model(x))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
