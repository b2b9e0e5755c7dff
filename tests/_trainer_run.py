"""A Hugging Face Trainer run of a split GPT-2, for tests/test_dropin_hf.py (one process per run).

    python tests/_trainer_run.py OUT_DIR first|resume

``first`` trains 6 steps from seed 0, checkpointing every 3, and saves the final state dict;
``resume`` builds the model from another seed and resumes from ``OUT_DIR/checkpoint-3``. The two
may start together: ``resume`` waits (after its imports) until ``first`` has finished.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import transformers

import paramsplit
from paramsplit import FROZEN, Regions, rows


def build(seed: int):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                     n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    mask = torch.rand(32, 96, generator=torch.Generator().manual_seed(5)) < 0.5
    spec = {"transformer.wte": rows({(0, 90): FROZEN}),
            "transformer.h.*.attn.c_attn": Regions(mask, {True: {"weight_decay": 0.0},
                                                          False: {"weight_decay": 0.3}})}
    return paramsplit.split(model, spec)


def data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (24, 16), generator=g)
    return [{"input_ids": t, "labels": t} for t in ids]


def main(out: Path, mode: str) -> None:
    if mode == "resume":
        deadline = time.monotonic() + 300
        while not (out / "first.done").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {out / 'first.done'}: did the first run fail?")
            time.sleep(0.05)
    model, groups = build(0 if mode == "first" else 123)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=6, save_steps=3, save_strategy="steps",
        per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
        logging_steps=100, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data(),
                                   optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3") if mode == "resume" else None)
    torch.save(model.state_dict(), out / f"final-{mode}.pt")
    if mode == "first":
        (out / "first.done").touch()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
