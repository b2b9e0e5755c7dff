"""Two Hugging Face Trainer runs of a split GPT-2, each in a process of its own, for
tests/test_dropin_hf.py::test_trainer_resume_in_a_new_process_is_bitwise.

    python tests/_trainer_run.py OUT_DIR

``first`` trains 6 steps from seed 0, checkpointing every 3, and saves the final state dict to
``OUT_DIR/final-first.pt``; then ``resume`` builds the model from another seed, resumes from
``OUT_DIR/checkpoint-3`` and saves ``final-resume.pt``. Each run is a child forked from a process
that has imported but trained nothing, so neither run inherits anything of the other and the
imports are paid once: this script, or, through :func:`start`, pytest right after collection.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

import paramsplit
from paramsplit import FROZEN, Regions, rows


#: the token embedding's rows below this are FROZEN (the "old vocabulary")
FROZEN_ROWS = 90


def gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    """A tiny GPT-2 (its ``lm_head`` tied to ``transformer.wte``), unsplit."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                     n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def spec(decays: tuple[float, float] = (0.0, 0.3)) -> dict:
    """FROZEN old-vocabulary rows (rows layout, a tied weight) and a scattered mask over each
    attention projection (mask layout) whose two regions get ``decays``; ``None`` for a region
    leaves it on the optimizer's defaults."""
    mask = torch.rand(32, 96, generator=torch.Generator().manual_seed(5)) < 0.5
    options = [{} if d is None else {"weight_decay": d} for d in decays]
    return {"transformer.wte": rows({(0, FROZEN_ROWS): FROZEN}),
            "transformer.h.*.attn.c_attn": Regions(mask, {True: options[0],
                                                          False: options[1]})}


def build(seed: int, decays: tuple[float, float] = (0.0, 0.3), per_element_decay: bool = False):
    """``paramsplit.split(gpt2(seed), spec(decays))``: (the model, its param groups). The mask's
    regions differ only in weight_decay: parts (the mask layout) unless ``per_element_decay``,
    which keeps the attention projections whole (the decay layout)."""
    model = gpt2(seed)
    out = paramsplit.split(model, spec(decays), per_element_decay=per_element_decay)
    assert out[0] is model
    layouts = {line.split()[-1] for line in paramsplit.describe(model).splitlines()[1:]}
    assert layouts == {"rows", "decay" if per_element_decay else "mask"}, layouts
    return out


def data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (24, 16), generator=g)
    return [{"input_ids": t, "labels": t} for t in ids]


def main(out: Path, mode: str) -> None:
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


def _fork(fn: Callable[..., None], *args: Any, log: Path | None = None) -> int:
    """Run ``fn(*args)`` in a child forked from this process (output to ``log`` if given); its
    exit status is 0 unless it raised. Returns the child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        if log is not None:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # noqa: SIM115
        fn(*args)
    except BaseException:  # noqa: BLE001 - reported through the exit status
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def both(out: Path) -> None:
    """The first run, then the resume, each in a child of this process."""
    for mode in ("first", "resume"):
        _, status = os.waitpid(_fork(main, out, mode), 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"the {mode} run failed (wait status {status})")


def start(out: Path, timeout: float = 300) -> Callable[[], None]:
    """Start :func:`both` in a child forked from the caller, which must have imported torch,
    transformers and ``transformers.Trainer``, trained nothing and started no threads (pytest
    right after collection). Returns a function that waits for it and raises if it failed
    (output in ``out/log.txt``)."""
    log = out / "log.txt"
    pid = _fork(both, out, log=log)

    def wait() -> None:
        deadline = time.monotonic() + timeout
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"the Trainer runs did not end within {timeout} s:\n"
                                   f"{log.read_text()[-4000:]}")
            time.sleep(0.1)
        if os.waitstatus_to_exitcode(done[1]) != 0:
            raise RuntimeError(f"the Trainer runs failed:\n{log.read_text()[-4000:]}")
    return wait


if __name__ == "__main__":
    both(Path(sys.argv[1]))
