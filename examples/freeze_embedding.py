"""Freeze the first N token embeddings (a pretrained vocabulary) and train only new tokens.

Gradient hooks that zero the frozen rows' gradients are not enough: AdamW's weight decay and
momentum still move them. With paramsplit the frozen rows are in no optimizer group: the
optimizer steps only the new rows, keeps no state for the old ones, and they stay bitwise
unchanged. The model itself is not modified (``split`` returns it as it was).

Run: python examples/freeze_embedding.py
"""

import torch
from torch import nn

import paramsplit

torch.manual_seed(0)
old_vocab, new_tokens, dim = 1000, 24, 32
model = nn.Sequential(nn.Embedding(old_vocab + new_tokens, dim), nn.Linear(dim, old_vocab + new_tokens))

model, groups = paramsplit.split(model, {"0": paramsplit.rows({(0, old_vocab): paramsplit.FROZEN})})
print(paramsplit.describe(model))
opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)

before = model[0].weight.detach().clone()
for step in range(20):
    tokens = torch.randint(0, old_vocab + new_tokens, (16, 8))
    opt.zero_grad()
    logits = model(tokens)
    nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    opt.step()

after = model[0].weight.detach()
assert torch.equal(after[:old_vocab], before[:old_vocab]), "frozen rows moved"
assert not torch.equal(after[old_vocab:], before[old_vocab:]), "new rows did not train"
trained = sum(p.numel() for p in model.parameters()) - old_vocab * dim
state_elems = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
assert state_elems == 2 * trained  # exp_avg and exp_avg_sq of the trained elements only
print(f"old rows unchanged, new rows trained; AdamW state holds {state_elems} elements "
      f"(2 per trained element; none for the {old_vocab * dim} frozen ones)")
