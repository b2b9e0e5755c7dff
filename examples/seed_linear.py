"""The forum question that started paramsplit, solved.

    "I have a fully connected layer nn.Linear(10, 1). In the optimizer, I want to assign
     different weight_decay for the parameters in this layer: inputs 0-4 and inputs 5-9."

The answer there was a hand-written masked L2 penalty. With paramsplit the optimizer steps the
weight's two column blocks as separate parts, each with its own weight_decay, and any optimizer
(here AdamW, whose decoupled decay no penalty can express) applies them exactly. The model itself
is not changed: same parameters, same outputs, same state dict.

Run: python examples/seed_linear.py
"""

import copy

import torch
from torch import nn

import paramsplit

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 1), nn.Tanh())
mask = torch.zeros(1, 10, dtype=torch.long)
mask[:, :5] = 1  # the question as asked: inputs 0-4 one way, inputs 5-9 another
decays = {1: {"weight_decay": 0.01}, 0: {"weight_decay": 0.1}}

original = copy.deepcopy(model)
split_model, groups = paramsplit.split(model, {"0": paramsplit.Regions(mask, decays)})
assert split_model is model  # the model itself, untouched
print(paramsplit.describe(model))  # a mask of column blocks takes the `cols` layout
opt = torch.optim.AdamW(groups, lr=1e-2)

x, y = torch.randn(256, 10), torch.randn(256, 1)
assert torch.equal(model(x), original(x))  # same function, bit for bit

for step in range(200):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
print(f"loss after 200 steps: {loss.item():.4f}")

# The answer working: with a zero gradient, AdamW's decoupled decay alone shrinks each block of
# inputs at its own rate, (1 - lr * weight_decay) per step. The unsplit layer can only have one.
unsplit = copy.deepcopy(original)
unsplit.load_state_dict(model.state_dict())  # the trained weights, in the original format
lr, steps = 0.05, 100
opts = [torch.optim.AdamW(paramsplit.param_groups(model), lr=lr),  # a fresh optimizer
        torch.optim.AdamW(unsplit.parameters(), lr=lr, weight_decay=0.01)]
start = model[0].weight.detach().clone()
for _ in range(steps):
    for m, o in zip((model, unsplit), opts):
        o.zero_grad()
        (0 * m(x)).sum().backward()  # a zero gradient: only the decay acts
        o.step()
ratio_split = (model[0].weight.detach() / start)[0]
ratio_unsplit = (unsplit[0].weight.detach() / start)[0]
print(f"weight after {steps} zero-gradient AdamW steps (lr={lr}), as a fraction of before:")
print(f"  {'inputs':8}  {'paramsplit':>10}  {'expected':>8}  {'unsplit wd=0.01':>15}")
for cols, wd in ((slice(0, 5), 0.01), (slice(5, 10), 0.1)):
    want = (1 - lr * wd) ** steps
    got = ratio_split[cols]
    assert torch.allclose(got, torch.full_like(got, want), rtol=1e-4)
    print(f"  {cols.start}-{cols.stop - 1:<6}  {got.mean().item():>10.4f}  {want:>8.4f}  "
          f"{ratio_unsplit[cols].mean().item():>15.4f}")

# Drop-in: the state dict has the original keys and loads into a plain, never-split model.
original.load_state_dict(model.state_dict(), strict=True)
assert torch.equal(original(x), model(x))
print("model.state_dict() loads into a plain nn.Linear with the same outputs: ok")
