"""A split model in the tools people train with: Trainer, accelerate, safetensors, PEFT.

Every test uses the real library; the oracle is the run or the model without the round trip.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, rows

sys.path.insert(0, str(Path(__file__).parent))
import _trainer_run  # noqa: E402

def _equal_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def background(items: list[pytest.Item], out: Path) -> Callable[[], Path]:
    """Start the two Trainer runs (see conftest.py and ``_trainer_run.py``): the first trains 6
    steps and checkpoints at step 3; then, in a new process, the second resumes from step 3."""
    if not any(item.name == "test_trainer_resume_in_a_new_process_is_bitwise" for item in items):
        return lambda: out
    transformers.Trainer  # noqa: B018 - imported before the fork: the runs need it
    runs = _trainer_run.start(out)

    def wait() -> Path:
        runs()
        return out
    return wait


def test_trainer_resume_in_a_new_process_is_bitwise(background_result: Path):
    """Trainer loads the checkpoint with strict=False and only logs mismatches: the split model
    must take the original keys, or its weights silently keep their fresh init."""
    tmp_path = background_result
    first = torch.load(tmp_path / "final-first.pt", weights_only=True)
    resumed = torch.load(tmp_path / "final-resume.pt", weights_only=True)
    _equal_state(first, resumed)
    init = _trainer_run.build(0)[0].state_dict()["transformer.wte.weight"]
    other_init = _trainer_run.build(123)[0].state_dict()["transformer.wte.weight"]
    assert torch.equal(resumed["transformer.wte.weight"][:90], init[:90])  # FROZEN rows
    assert not torch.equal(init[:90], other_init[:90])
    assert not torch.equal(resumed["transformer.wte.weight"][90:], init[90:])


def _trainer(model, out, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_steps=100, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_trainer_run.data(),
                                **kwargs)


def test_trainer_default_optimizer_warns_and_the_two_documented_ways_do_not(tmp_path):
    model, groups = _trainer_run.build(0)
    with pytest.warns(UserWarning, match=r"transformer\.h\.0\.attn\.c_attn\.weight__0 \(region False: weight_decay=0\.3\)"):
        _trainer(model, tmp_path).train()
    for kwargs in ({"optimizers": (torch.optim.AdamW(groups, lr=1e-2), None)},
                   {"optimizer_cls_and_kwargs": (torch.optim.AdamW,
                                                 {"params": groups, "lr": 1e-2})}):
        model, groups = _trainer_run.build(0)
        if "optimizers" in kwargs:
            kwargs = {"optimizers": (torch.optim.AdamW(groups, lr=1e-2), None)}
        else:
            kwargs = {"optimizer_cls_and_kwargs": (torch.optim.AdamW,
                                                   {"params": groups, "lr": 1e-2})}
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="paramsplit")
            trainer = _trainer(model, tmp_path, **kwargs)
            trainer.train()
        decays = {g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups}
        assert decays["weight_decay=0.3"] == 0.3 and decays["weight_decay=0.0"] == 0.0


def test_trainer_save_model_round_trips(tmp_path):
    model, groups = _trainer_run.build(0)
    trainer = _trainer(model, tmp_path, optimizers=(torch.optim.AdamW(groups, lr=1e-2), None))
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "saved")
    _equal_state(plain.state_dict(), model.state_dict())
    again, _ = _trainer_run.build(7)
    from safetensors.torch import load_model

    load_model(again, str(tmp_path / "saved" / "model.safetensors"), strict=False)
    _equal_state(again.state_dict(), model.state_dict())


def _small(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 30))
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(3)) < 0.5
    spec = {"0": rows({(0, 20): FROZEN}), "1": Regions(mask, {True: {"weight_decay": 0.0},
                                                             False: {"weight_decay": 0.2}}),
            "3": paramsplit.cols({(0, 4): {"lr": 0.5}})}
    return paramsplit.split(model, spec)


def _train(model, opt, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 30, (4, 5), generator=g)
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        opt.step()


def test_safetensors_save_model_and_load_model_round_trip(tmp_path):
    from safetensors.torch import load_file, load_model, save_model

    model, groups = _small()
    _train(model, torch.optim.AdamW(groups, lr=1e-2))
    save_model(model, str(tmp_path / "m.safetensors"))
    assert set(load_file(str(tmp_path / "m.safetensors"))) == set(model.state_dict())
    fresh, _ = _small(seed=3)
    missing, unexpected = load_model(fresh, str(tmp_path / "m.safetensors"))
    assert not missing and not unexpected
    _equal_state(fresh.state_dict(), model.state_dict())


def test_accelerate_save_state_and_load_state_round_trip(tmp_path):
    from accelerate import Accelerator

    model, groups = _small()
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, torch.optim.AdamW(groups, lr=1e-2))
    _train(model, opt)
    acc.save_state(str(tmp_path / "state"))
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(paramsplit.param_groups(reference), lr=1e-2)
    ref_opt.load_state_dict(opt.state_dict())

    fresh, fresh_groups = _small(seed=9)
    acc = Accelerator(cpu=True)  # a new run
    fresh, fresh_opt = acc.prepare(fresh, torch.optim.AdamW(fresh_groups, lr=1e-2))
    acc.load_state(str(tmp_path / "state"))
    _equal_state(fresh.state_dict(), model.state_dict())
    _train(fresh, fresh_opt, seed=4)
    _train(reference, ref_opt, seed=4)
    _equal_state(fresh.state_dict(), reference.state_dict())


def test_peft_lora_on_a_split_model_keeps_frozen_regions_and_options():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 8)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 30)

        def forward(self, x):
            return self.head(torch.tanh(self.proj(self.emb(x))))

    torch.manual_seed(0)
    base = Net()
    # new tokens 20..29 train with their own decay, old ones are FROZEN; LoRA adapts `proj`
    split_model, _ = paramsplit.split(base, {"emb": rows({(0, 20): FROZEN,
                                                         (20, None): {"weight_decay": 0.5}})})
    config = peft.LoraConfig(r=2, target_modules=["proj"], modules_to_save=["emb"])
    model = peft.get_peft_model(split_model, config)
    groups = paramsplit.param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert any("emb" in n and "weight__1" in n for n in by_group["weight_decay=0.5"])
    assert all("lora_" in n for n in by_group["default"])
    emb = model.base_model.model.emb.modules_to_save["default"]
    before = emb.weight.detach().clone()
    proj_before = model.base_model.model.proj.base_layer.weight.detach().clone()
    opt = torch.optim.AdamW(groups, lr=1e-2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="paramsplit")
        _train(model, opt, steps=3)
    after = emb.weight.detach()
    assert torch.equal(after[:20], before[:20])  # FROZEN rows stay frozen
    assert not torch.equal(after[20:], before[20:])
    assert torch.equal(model.base_model.model.proj.base_layer.weight, proj_before)
    assert not any(p.requires_grad and "__0" in n for n, p in model.named_parameters()
                   if "emb" in n)
