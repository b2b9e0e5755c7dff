"""Sparse fine-tuning: train the 1% most important elements of every weight, freeze the rest.

FISH-style: one batch's gradient magnitude picks, per 2-D weight of GPT-2's blocks, the top 1%
of elements; they train with AdamW, everything else in those weights is FROZEN. paramsplit picks
its `sparse` layout by itself (the FROZEN region is most of each weight). The model is not
changed: its forward and backward run as before. The optimizer steps the trained elements as
small dense parts (gathered from the weights before each step, written back after it) and keeps
state for them only.

Run: python examples/sparse_finetune.py
"""

import copy
import time

import torch
import transformers

import paramsplit
from paramsplit import FROZEN, Regions

torch.manual_seed(0)
transformers.logging.set_verbosity_error()
config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000,
                                 n_positions=64, bos_token_id=0, eos_token_id=0)
model = transformers.GPT2LMHeadModel(config)
batch = torch.randint(0, 1000, (8, 32))


def loss_of(m: torch.nn.Module) -> torch.Tensor:
    return m(batch, labels=batch).loss


# FISH-style importance: |gradient| on one batch, top 1% per weight
loss_of(model).backward()
spec = {}
for name, p in model.transformer.h.named_parameters():
    if p.dim() == 2:
        k = max(1, p.numel() // 100)
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        mask[p.grad.abs().flatten().topk(k).indices] = True
        spec[f"transformer.h.{name}"] = Regions(mask.view_as(p), {True: {"weight_decay": 0.01},
                                                                  False: FROZEN})
model.zero_grad(set_to_none=True)

full = copy.deepcopy(model)  # full fine-tuning, for comparison
model, groups = paramsplit.split(model, spec)
table = paramsplit.describe(model).splitlines()
print("\n".join(table[:3]))
print(f"... ({len(table) - 1} regions of {len(spec)} weights)")
frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k in spec}

runs = {"sparse (paramsplit)": (model, torch.optim.AdamW(groups, lr=1e-3)),
        "full fine-tuning": (full, torch.optim.AdamW(full.parameters(), lr=1e-3))}
times: dict[str, list[float]] = {k: [] for k in runs}
for step in range(8):
    for label, (m, opt) in runs.items():
        start = time.perf_counter()
        opt.zero_grad()
        loss_of(m).backward()
        opt.step()
        if step >= 2:  # warm-up
            times[label].append(time.perf_counter() - start)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


base = sorted(times["full fine-tuning"])[len(times["full fine-tuning"]) // 2]
for label, (m, opt) in runs.items():
    median = sorted(times[label])[len(times[label]) // 2]
    print(f"{label:20}  step {median * 1e3:7.1f} ms ({median / base:.2f}x)  "
          f"optimizer state {state_bytes(opt) / 2**20:6.2f} MiB")

after = model.state_dict()
for key, plan in spec.items():
    frozen = ~plan.mask
    assert torch.equal(after[key][frozen], frozen_before[key][frozen]), key
    assert not torch.equal(after[key][~frozen], frozen_before[key][~frozen]), key
print(f"frozen elements of {len(spec)} weights bitwise unchanged; trained elements moved: ok")
