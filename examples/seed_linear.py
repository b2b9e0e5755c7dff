"""The forum question that started paramsplit, solved.

    "I have a fully connected layer nn.Linear(10, 1). In the optimizer, I want to assign
     different weight_decay for the parameters in this layer: inputs 0-4 and inputs 5-9."

The answer there was a hand-written masked L2 penalty. With paramsplit the plan says which
inputs get which weight_decay; since the two blocks differ only in weight_decay, nothing is cut
into parts (the ``decay`` layout): the weight stays one tensor, in a param group whose own
weight_decay is 0, and at each step paramsplit decays every element the way the stepping
optimizer decays (AdamW: ``p *= 1 - lr * wd`` before its update; SGD: its update sees
``grad + wd * p``). Below, each is checked bit for bit against the per-element rule written by
hand. The model itself is not changed: same parameters, same outputs, same state dict.

Run: python examples/seed_linear.py
"""

import copy

import torch
from torch import nn

import paramsplit

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 1), nn.Tanh())
# the question as asked: inputs 0-4 one way, inputs 5-9 another (a decay tensor of the weight's
# shape, torch.tensor([[0.01] * 5 + [0.1] * 5]), is the same plan)
plan = paramsplit.cols({(0, 5): {"weight_decay": 0.01}, (5, None): {"weight_decay": 0.1}})
wd = torch.tensor([[0.01] * 5 + [0.1] * 5], dtype=torch.float64)  # the same, per element

original = copy.deepcopy(model)
split_model, groups = paramsplit.split(model, {"0": plan})
assert split_model is model  # the model itself, untouched
print(paramsplit.describe(model))  # layout `decay`: no parts, the weight stays whole
for g in groups:
    print(f"  group {g['name']!r}: weight_decay={g.get('weight_decay', 'default')}, "
          f"{len(g['params'])} tensor(s)")

x, y = torch.randn(256, 10), torch.randn(256, 1)
assert torch.equal(model(x), original(x))  # same function, bit for bit


def hand_written(kind, lr):
    """The per-element rule written by hand: a copy of the layer, trained by the same optimizer
    with weight_decay=0, each element's decay applied as that optimizer applies its own."""
    ref = copy.deepcopy(original)
    w = ref[0].weight
    own = [{"params": [w], "weight_decay": 0.0}, {"params": [ref[0].bias]}]  # bias: defaults
    opt = (torch.optim.AdamW(own, lr=lr) if kind == "AdamW" else
           torch.optim.SGD(own, lr=lr, momentum=0.9))

    def step():
        opt.zero_grad()
        loss = nn.functional.mse_loss(ref(x), y)
        loss.backward()
        with torch.no_grad():
            if kind == "AdamW":  # decoupled: shrink first, by each element's own factor
                w.mul_((1 - lr * wd).float())
            else:  # coupled: the update sees grad + wd * p, rounded as SGD's own
                # addcmul_ rounds grad + wd * p as SGD's grad.add(p, alpha=wd) does; a separate
                # product (w.grad + w * wd) can differ in the last bit
                w.grad.addcmul_(w, wd.float())
        opt.step()
        return loss
    return ref, step


for kind, lr in (("AdamW", 1e-2), ("SGD", 5e-2)):
    model.load_state_dict(original.state_dict())
    groups = paramsplit.param_groups(model)  # fresh dicts: an optimizer fills in its defaults
    opt = (torch.optim.AdamW(groups, lr=lr) if kind == "AdamW" else
           torch.optim.SGD(groups, lr=lr, momentum=0.9))
    ref, ref_step = hand_written(kind, lr)
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        ref_step()
        assert torch.equal(model[0].weight, ref[0].weight)  # every step, bit for bit
        assert torch.equal(model[0].bias, ref[0].bias)
    print(f"{kind}: loss after 200 steps: {loss.item():.4f}; equal to the hand-written "
          f"per-element rule at every step, bit for bit")

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
for cols, w in ((slice(0, 5), 0.01), (slice(5, 10), 0.1)):
    want = (1 - lr * w) ** steps
    got = ratio_split[cols]
    assert torch.allclose(got, torch.full_like(got, want), rtol=1e-4)
    print(f"  {cols.start}-{cols.stop - 1:<6}  {got.mean().item():>10.4f}  {want:>8.4f}  "
          f"{ratio_unsplit[cols].mean().item():>15.4f}")

# Drop-in: the state dict has the original keys and loads into a plain, never-split model.
original.load_state_dict(model.state_dict(), strict=True)
assert torch.equal(original(x), model(x))
print("model.state_dict() loads into a plain nn.Linear with the same outputs: ok")
