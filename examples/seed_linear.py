"""The forum question that started paramsplit, solved.

    "I have a fully connected layer nn.Linear(10, 1). In the optimizer, I want to assign
     different weight_decay for the parameters in this layer: inputs 0-4 and inputs 5-9."

The answer there was a hand-written masked L2 penalty. With paramsplit the weight is split into
its two column blocks, each with its own weight_decay, and any optimizer (here AdamW, whose
decoupled decay no penalty can express) applies them exactly.

Run: python examples/seed_linear.py
"""

import torch
from torch import nn

import paramsplit

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 1), nn.Tanh())

split_model, groups = paramsplit.split(model, {
    "0": paramsplit.cols({(0, 5): {"weight_decay": 0.01}, (5, None): {"weight_decay": 0.1}}),
})
print(paramsplit.describe(split_model))
opt = torch.optim.AdamW(groups, lr=1e-2)

x, y = torch.randn(256, 10), torch.randn(256, 1)
assert torch.equal(split_model(x), model(x))  # same function, bit for bit

for step in range(200):
    opt.zero_grad()
    loss = nn.functional.mse_loss(split_model(x), y)
    loss.backward()
    opt.step()

weight = paramsplit.merged_state_dict(split_model)["0.weight"]
print(f"loss after 200 steps: {loss.item():.4f}")
print("weight, inputs 0-4 (weight_decay=0.01):", [round(v, 4) for v in weight[0, :5].tolist()])
print("weight, inputs 5-9 (weight_decay=0.1): ", [round(v, 4) for v in weight[0, 5:].tolist()])

# The trained weights load back into the plain model (original keys and shapes).
model.load_state_dict(paramsplit.merged_state_dict(split_model), strict=True)
assert torch.equal(model(x), split_model(x))
print("merged weights load into the original nn.Linear: ok")
