"""Different learning rates for the q, k and v blocks of a fused attention projection.

GPT-2's ``attn.c_attn`` is a ``Conv1D`` whose weight, of shape (n_embd, 3 * n_embd), holds the
query, key and value projections side by side: three column blocks (a fused ``nn.Linear``, as in
Llama-style models, holds them as row blocks: ``paramsplit.rows``). Here the query and key
blocks train at a tenth of the value block's learning rate, and the check is the model trained
with q, k and v as three tensors of their own (the oracle), bit for bit. The model is not
modified: ``split`` returns it as it was, and its state dict loads into a plain GPT-2.

Run: python examples/qkv_fused_projection.py
"""

import copy

import torch
from torch.func import functional_call
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

import paramsplit

logging.set_verbosity_error()
torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # the same forward twice
model = GPT2LMHeadModel(config)
oracle = copy.deepcopy(model)
E, LR, LR_QK = config.n_embd, 1e-3, 1e-4

# q and k at LR_QK, v at the optimizer's lr: three column blocks of c_attn's weight
qkv = paramsplit.cols({(0, E): {"lr": LR_QK}, (E, 2 * E): {"lr": LR_QK}, (2 * E, None): {}})
model, groups = paramsplit.split(model, {"transformer.h.*.attn.c_attn.weight": qkv})
print(paramsplit.describe(model))
opt = torch.optim.AdamW(groups, lr=LR, weight_decay=0.01)

# the oracle: q, k and v as tensors of their own, concatenated into c_attn's weight each forward
fused = {n: p for n, p in oracle.named_parameters() if n.endswith("attn.c_attn.weight")}
blocks = {n: [torch.nn.Parameter(w.detach()[:, i * E:(i + 1) * E].clone()) for i in range(3)]
          for n, w in fused.items()}
rest = {n: p for n, p in oracle.named_parameters() if n not in fused}
oracle_opt = torch.optim.AdamW(
    [{"params": [b for q, k, v in blocks.values() for b in (q, k)], "lr": LR_QK},
     {"params": [v for _, _, v in blocks.values()]},
     {"params": list(rest.values())}], lr=LR, weight_decay=0.01)


def oracle_params():
    return {**rest, **{n: torch.cat(b, dim=1) for n, b in blocks.items()}}


for step in range(5):
    ids = torch.randint(0, config.vocab_size, (4, 16))
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    oracle_opt.zero_grad()
    functional_call(oracle, oracle_params(), (), {"input_ids": ids, "labels": ids}).loss.backward()
    oracle_opt.step()

want = oracle_params()
same = all(torch.equal(p, want[n]) for n, p in model.named_parameters())
print(f"q/k/v blocks train bitwise as three separate tensors: {'ok' if same else 'MISMATCH'}")
assert same
plain = GPT2LMHeadModel(config)
plain.load_state_dict(model.state_dict())
print("the trained model's state dict loads into a plain GPT-2")
