"""RigL-style dynamic sparse training of a GPT-2 with ``paramsplit.resplit``.

A small GPT-2 is built from a config (no download). 5% of each block weight (``attn.c_attn``,
``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) trains; the other 95% is FROZEN
(``Regions(mask, {True: {...}, False: FROZEN})``). The embeddings (tied to the output layer),
layer norms and biases train densely, as RigL usually keeps them. Every ``EVERY`` steps, per
block weight:

* drop: the 20% of trained elements with the smallest magnitude become FROZEN (they keep the
  value they reached and lose their optimizer state);
* grow: as many FROZEN elements start training, those with the largest gradient magnitude
  (among the elements that were FROZEN before the drop). The gradient is the dense
  ``weight.grad`` of the step that just ran: between optimizer steps paramsplit leaves it in
  the weight's own layout, FROZEN elements included. The model is dense, so a grown element
  starts from its current value (RigL proper starts it at zero), with zero optimizer state.

``paramsplit.resplit(optimizer, model, spec)`` applies the new masks to the live optimizer:
elements that keep training keep their AdamW moments; the optimizer object and the model stay
as they are. The run is compared with a run whose mask never changes (same initial weights,
same initial mask, same batches). The data are random token sequences drawn from a fixed random
bigram table (each token has 4 possible successors), so the loss can fall towards log(4) = 1.39.

Run: ``python examples/rigl.py`` (about 20 s on 2 CPU cores; one torch thread, which is
fastest for a model this small). ``RIGL_STEPS=N`` changes the number of steps (default 300).
"""

from __future__ import annotations

import copy
import math
import os
import time

import torch
import transformers

import paramsplit
from paramsplit import FROZEN, Regions

STEPS = int(os.environ.get("RIGL_STEPS", "300"))
EVERY = 50  # steps between two drop-and-grow updates
DENSITY = 0.05  # share of each block weight that trains
DROP = 0.2  # share of the trained elements dropped (and as many grown) at each update
LR = 3e-3
VOCAB, SEQ, BATCH, SUCCESSORS = 1000, 32, 8, 4
BLOCK_WEIGHTS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
OPTIONS = {"weight_decay": 0.0}  # the AdamW options of each weight's trained elements


def build() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                     n_positions=SEQ, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def block_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {f"transformer.h.{i}.{w}": block.get_submodule(w).weight
            for i, block in enumerate(model.transformer.h) for w in BLOCK_WEIGHTS}


def spec_of(masks: dict[str, torch.Tensor]) -> dict[str, Regions]:
    return {name: Regions(mask, {True: OPTIONS, False: FROZEN}) for name, mask in masks.items()}


def batches(steps: int) -> list[torch.Tensor]:
    """``steps`` batches of sequences from a random bigram table (the same for both runs)."""
    g = torch.Generator().manual_seed(1)
    table = torch.randint(0, VOCAB, (VOCAB, SUCCESSORS), generator=g)
    out = []
    for _ in range(steps):
        ids = torch.empty(BATCH, SEQ, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=g)
        pick = torch.randint(0, SUCCESSORS, (BATCH, SEQ), generator=g)
        for t in range(1, SEQ):
            ids[:, t] = table[ids[:, t - 1], pick[:, t]]
        out.append(ids)
    return out


def drop_and_grow(weight: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """RigL's update of one weight's mask: drop the smallest-magnitude ``DROP`` share of the
    trained elements, grow as many FROZEN ones by gradient magnitude."""
    flat = trained.flatten()
    k = int(DROP * int(flat.sum()))
    magnitude = weight.detach().abs().flatten().masked_fill(~flat, math.inf)
    gradient = weight.grad.abs().flatten().masked_fill(flat, -math.inf)
    new = flat.clone()
    new[magnitude.topk(k, largest=False).indices] = False
    new[gradient.topk(k).indices] = True
    return new.view_as(trained)


def train(model: torch.nn.Module, masks: dict[str, torch.Tensor], data: list[torch.Tensor],
          rigl: bool) -> dict:
    """Train on ``data``; with ``rigl``, drop and grow every ``EVERY`` steps."""
    model, groups = paramsplit.split(model, spec_of(masks))
    opt = torch.optim.AdamW(groups, lr=LR)
    weights = block_weights(model)
    ever = {n: m.clone() for n, m in masks.items()}  # elements that trained at some point
    losses: list[float] = []
    resplit_s = update_s = 0.0
    updates = 0
    start = time.perf_counter()
    for step, ids in enumerate(data, 1):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if rigl and step % EVERY == 0 and step < len(data):
            t0 = time.perf_counter()
            with torch.no_grad():
                masks = {n: drop_and_grow(weights[n], masks[n]) for n in masks}
            t1 = time.perf_counter()
            paramsplit.resplit(opt, model, spec_of(masks))
            t2 = time.perf_counter()
            update_s, resplit_s, updates = update_s + t2 - t0, resplit_s + t2 - t1, updates + 1
            for n in masks:
                ever[n] |= masks[n]
        opt.zero_grad()
    return {"model": model, "losses": losses, "masks": masks, "ever": ever,
            "resplit_s": resplit_s, "update_s": update_s, "updates": updates,
            "total_s": time.perf_counter() - start}


def main() -> None:
    transformers.logging.set_verbosity_error()
    model = build()
    initial = {n: w.detach().clone() for n, w in block_weights(model).items()}
    g = torch.Generator().manual_seed(2)
    masks = {}
    for name, w in initial.items():
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        mask[torch.randperm(w.numel(), generator=g)[:round(DENSITY * w.numel())]] = True
        masks[name] = mask.view_as(w)
    data = batches(STEPS)
    fixed_model = copy.deepcopy(model)
    train(copy.deepcopy(model), masks, data[:3], rigl=False)  # warm-up, not timed

    rigl = train(model, masks, data, rigl=True)
    fixed = train(fixed_model, masks, data, rigl=False)
    table = paramsplit.describe(rigl["model"]).splitlines()
    print("\n".join(table[:3]))
    print(f"... ({len(table) - 1} regions: {len(masks)} block weights, {DENSITY:.0%} of each "
          f"trained)")

    print(f"\nloss (mean of the 10 steps up to each step; random bigram data, "
          f"floor log({SUCCESSORS}) = {math.log(SUCCESSORS):.2f})")
    print(f"{'step':>6}  {'RigL':>7}  {'fixed mask':>10}")
    marks = sorted({1, min(EVERY, STEPS), *range(2 * EVERY, STEPS + 1, 2 * EVERY), STEPS})
    for s in marks:
        lo = max(0, s - 10)
        mean = [sum(r["losses"][lo:s]) / (s - lo) for r in (rigl, fixed)]
        print(f"{s:>6}  {mean[0]:7.3f}  {mean[1]:10.3f}")

    # what RigL did to the masks, and what it left alone
    final = block_weights(rigl["model"])
    for name, mask in rigl["masks"].items():
        assert int(mask.sum()) == int(masks[name].sum()), name  # as many grown as dropped
        never = ~rigl["ever"][name]  # FROZEN all along
        assert torch.equal(final[name].detach()[never], initial[name][never]), name
    moved = sum(int((rigl["masks"][n] & ~masks[n]).sum()) for n in masks)
    trained = sum(int(m.sum()) for m in masks.values())
    print(f"\n{rigl['updates']} drop-and-grow updates: {moved} of the {trained} trained "
          f"elements are not in the initial mask; elements never trained bitwise unchanged: ok")
    n = max(1, rigl["updates"])
    print(f"time in paramsplit.resplit: {rigl['resplit_s'] * 1e3:.1f} ms in total "
          f"({rigl['resplit_s'] / n * 1e3:.1f} ms an update), "
          f"{rigl['resplit_s'] / rigl['total_s']:.2%} of the {rigl['total_s']:.1f} s of training")
    print(f"time in the whole update (new masks + resplit): {rigl['update_s'] * 1e3:.1f} ms, "
          f"{rigl['update_s'] / rigl['total_s']:.2%}; one training step "
          f"{fixed['total_s'] / STEPS * 1e3:.1f} ms (the fixed-mask run)")


if __name__ == "__main__":
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main()
    finally:
        torch.set_num_threads(threads)
