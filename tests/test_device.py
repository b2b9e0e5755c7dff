"""The core contract on the device under test: CPU by default, CUDA with
``PARAMSPLIT_TEST_DEVICE=cuda`` (see ``benchmarks/gpu_check.sh``).

Bitwise forward and backward per layout and dtype, training equal to the unsplit model with
foreach (bitwise) and fused (up to rounding) AdamW, ``capturable=True``, FROZEN elements,
GPT-2 ``generate``, ``torch.compile``, and on CUDA a CUDA-graph-captured training step.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, cols, rows

DEVICE = torch.device(os.environ.get("PARAMSPLIT_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("PARAMSPLIT_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)
CUDA_ONLY = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs PARAMSPLIT_TEST_DEVICE=cuda")

# Inductor's code generation on the CPU is covered by test_lifecycle.py; here, on the CPU, dynamo
# and AOTAutograd trace the split model (the part paramsplit shapes) without compiling kernels.
COMPILE_BACKEND = "inductor" if DEVICE.type == "cuda" else "aot_eager"
SAME = {"weight_decay": 0.05}  # the optimizer's default: distinct parts, equal settings


def _plans(shape=(9, 12), same=False):
    g = torch.Generator().manual_seed(3)
    a, b = (SAME, SAME) if same else ({"weight_decay": 0.0}, {"lr": 0.05})
    return {
        "rows": rows({(0, 4): a, (4, None): b}),
        "cols": cols({(2, 7): a}),
        # three column blocks of one width: copied as one block (a fused projection's q / k / v)
        "qkv": cols({(0, 4): a, (4, 8): b, (8, None): {}}),
        "mask": Regions(torch.randint(0, 3, shape, generator=g), {0: {}, 1: a, 2: b}),
        "sparse": Regions(torch.rand(shape, generator=g) < 0.2, {True: a, False: FROZEN}),
        # regions that differ in weight_decay only: the decay layout, no parts
        "decay": Regions(torch.rand(shape, generator=g) < 0.5,
                         {True: SAME if same else {"weight_decay": 0.1}, False: {}}),
    }


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 5)).to(DEVICE, dtype)


@pytest.mark.parametrize("kind", ["rows", "cols", "qkv", "mask", "sparse", "decay"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_backward_bitwise(kind, dtype):
    model = _mlp(dtype)
    ref = copy.deepcopy(model)
    sm, _ = paramsplit.split(model, {"0.weight": _plans()[kind]})
    x = torch.randn(7, 12, device=DEVICE, dtype=dtype)
    out, want = sm(x), ref(x)
    assert torch.equal(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    assert sm is model  # the model itself: its gradient is the unsplit one, FROZEN included
    assert torch.equal(sm[0].weight.grad, ref[0].weight.grad)
    with torch.no_grad():
        assert torch.equal(sm.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("kind", ["rows", "cols", "qkv", "mask", "decay"])
@pytest.mark.parametrize("impl", ["foreach", "fused", "capturable"])
def test_training_equals_unsplit(kind, impl):
    model = _mlp()
    ref = copy.deepcopy(model)
    sm, groups = paramsplit.split(model, {"0.weight": _plans(same=True)[kind]},
                                  per_element_decay=kind == "decay")  # rows/cols/mask: parts
    assert paramsplit._sync._SPLITS[sm[0].weight].label == {"qkv": "cols"}.get(kind, kind)
    kw = {"foreach": {"foreach": True}, "fused": {"fused": True},
          "capturable": {"capturable": True, "foreach": True}}[impl]
    if impl == "capturable" and DEVICE.type == "cpu":
        kw = {"foreach": True}  # capturable needs an accelerator
    opts = [torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05, **kw),
            torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05, **kw)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 12, generator=g).to(DEVICE)
        for m, opt in zip((sm, ref), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    got, want = sm.state_dict()["0.weight"], ref.state_dict()["0.weight"]
    if impl == "fused":  # fused kernels may round an element by its position in the tensor
        torch.testing.assert_close(got, want)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["rows", "cols", "mask"])
def test_frozen_elements_never_change(kind):
    model = _mlp()
    plan = {"rows": rows({(0, 4): FROZEN}), "cols": cols({(2, 7): FROZEN}),
            "mask": Regions(torch.arange(108).view(9, 12) % 3 == 0, {True: FROZEN, False: {}})}
    frozen = torch.zeros(9, 12, dtype=torch.bool)
    frozen[:4] = kind == "rows"
    frozen[:, 2:7] |= kind == "cols"
    frozen |= (torch.arange(108).view(9, 12) % 3 == 0) & (kind == "mask")
    frozen = frozen.to(DEVICE)
    sm, groups = paramsplit.split(model, {"0.weight": plan[kind]})
    before = sm.state_dict()["0.weight"].clone()
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        sm(torch.randn(4, 12, device=DEVICE)).sum().backward()
        opt.step()
    after = sm.state_dict()["0.weight"]
    assert torch.equal(after[frozen], before[frozen]) and (after != before)[~frozen].all()


def test_gpt2_logits_and_generate_bitwise():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                     n_positions=32)
    model = transformers.GPT2LMHeadModel(config).to(DEVICE).eval()
    mask = torch.rand(32, 96, generator=torch.Generator().manual_seed(2)) < 0.5
    sm, _ = paramsplit.split(model, {
        "transformer.wte": rows({(0, 90): FROZEN}),
        "transformer.h.*.attn.c_attn": Regions(mask, {True: FROZEN, False: {}})})
    ids = torch.randint(0, 100, (2, 6), device=DEVICE)
    with torch.no_grad():
        assert torch.equal(sm(ids).logits, model(ids).logits)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(sm.generate(ids, **kw), model.generate(ids, **kw))


@pytest.mark.parametrize("kind", ["rows", "mask", "sparse"])
def test_compiled_training_step_matches_eager(kind):
    model = _mlp()
    eager, groups = paramsplit.split(copy.deepcopy(model), {"0.weight": _plans()[kind]})
    sm, groups_c = paramsplit.split(model, {"0.weight": _plans()[kind]})
    compiled = torch.compile(sm, fullgraph=True, backend=COMPILE_BACKEND)
    opts = [torch.optim.AdamW(groups_c, lr=1e-2), torch.optim.AdamW(groups, lr=1e-2)]
    x = torch.randn(8, 12, device=DEVICE)
    for _ in range(2):
        for m, opt in zip((compiled, eager), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(sm.state_dict()["0.weight"], eager.state_dict()["0.weight"])


@CUDA_ONLY
@pytest.mark.parametrize("kind", ["rows", "cols", "qkv", "mask", "decay"])
def test_cuda_graph_captured_training_step(kind):
    model = _mlp()
    ref = copy.deepcopy(model)
    sm, groups = paramsplit.split(model, {"0.weight": _plans(same=True)[kind]},
                                  per_element_decay=kind == "decay")
    kw = {"lr": 1e-2, "weight_decay": 0.05, "capturable": True, "foreach": True}
    opt, ref_opt = torch.optim.AdamW(groups, **kw), torch.optim.AdamW(ref.parameters(), **kw)
    static_x = torch.randn(8, 12, device=DEVICE)

    def step(m, o):
        o.zero_grad(set_to_none=False)
        m(static_x).square().mean().backward()
        o.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up (also sets up optimizer state)
            step(sm, opt)
            step(ref, ref_opt)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records, runs nothing
        step(sm, opt)
    for _ in range(3):
        static_x.copy_(torch.randn(8, 12, device=DEVICE))
        graph.replay()
        step(ref, ref_opt)
    torch.cuda.synchronize()
    assert torch.equal(sm.state_dict()["0.weight"], ref.state_dict()["0.weight"])
