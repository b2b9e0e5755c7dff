"""A split model in the tools people train with: Trainer, accelerate, safetensors, PEFT.

``paramsplit.split`` leaves the model as it is, so these tools see a plain model; only the
optimizer they are given must be built from paramsplit's groups. Every test uses the real
library; the oracle is the run without paramsplit (its FROZEN elements put back after each
step), or the model without the round trip.
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
    rows_ = _trainer_run.FROZEN_ROWS
    init = _trainer_run.gpt2(0).state_dict()["transformer.wte.weight"]
    other_init = _trainer_run.gpt2(123).state_dict()["transformer.wte.weight"]
    assert torch.equal(resumed["transformer.wte.weight"][:rows_], init[:rows_])  # FROZEN rows
    assert not torch.equal(init[:rows_], other_init[:rows_])
    assert not torch.equal(resumed["transformer.wte.weight"][rows_:], init[rows_:])
    # the checkpoint is a plain GPT-2 checkpoint: it loads with nothing missing or unexpected
    plain, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "checkpoint-3", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.equal(plain.transformer.wte.weight[:rows_], init[:rows_])
    assert plain.lm_head.weight is plain.transformer.wte.weight


def _trainer(model, out, max_steps=2, logging_steps=100, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=logging_steps,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0, data_seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_trainer_run.data(),
                                **kwargs)


def test_trainer_default_optimizer_warns_and_the_two_documented_ways_do_not(tmp_path):
    model, groups = _trainer_run.build(0)
    with pytest.warns(UserWarning, match=r"'transformer\.h\.0\.attn\.c_attn\.weight'"
                                         r"[\s\S]*not built from paramsplit's groups"):
        _trainer(model, tmp_path).train()
    init = _trainer_run.gpt2(0).transformer.wte.weight.detach()
    rows_ = _trainer_run.FROZEN_ROWS
    assert not torch.equal(model.transformer.wte.weight[:rows_], init[:rows_])  # what it warns
    for way in ("optimizers", "optimizer_cls_and_kwargs"):
        model, groups = _trainer_run.build(0)
        if way == "optimizers":
            kwargs = {"optimizers": (torch.optim.AdamW(groups, lr=1e-2), None)}
        else:
            kwargs = {"optimizer_cls_and_kwargs": (torch.optim.AdamW,
                                                   {"params": groups, "lr": 1e-2})}
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="paramsplit")
            trainer = _trainer(model, tmp_path, **kwargs)
            trainer.train()
        decays = {g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups}
        assert decays["weight_decay=0.3"] == 0.3 and decays["weight_decay=0.0"] == 0.0, way
        assert torch.equal(model.transformer.wte.weight[:rows_], init[:rows_]), way
        assert not torch.equal(model.transformer.wte.weight[rows_:], init[rows_:]), way


class _PutBack(transformers.TrainerCallback):
    """The oracle's FROZEN rows: put back after each optimizer step (before the next forward)."""

    def __init__(self, weight: torch.Tensor, rows_: int) -> None:
        self.weight, self.rows = weight, rows_
        self.before = weight.detach()[:rows_].clone()

    def on_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            self.weight[:self.rows] = self.before


@pytest.mark.parametrize("layout", ["parts", "decay"])
def test_trainer_logged_grad_norm_and_loss_equal_the_unsplit_run(tmp_path, layout):
    """Between steps the gradient is the unsplit one (FROZEN rows included), so the norm Trainer
    clips by and logs is the unsplit run's, step after step. Both regions of the mask keep the
    optimizer's defaults, so the unsplit run (FROZEN rows put back) is the oracle; the mask in
    parts, or kept whole (the decay layout)."""
    model, groups = _trainer_run.build(0, decays=(0.0, None),
                                       per_element_decay=layout == "decay")
    plain = _trainer_run.gpt2(0)
    logs = []
    for m, opt, callbacks in (
            (model, torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0), []),
            (plain, torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0),
             [_PutBack(plain.transformer.wte.weight, _trainer_run.FROZEN_ROWS)])):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="paramsplit")
            trainer = _trainer(m, tmp_path, max_steps=4, logging_steps=1,
                               optimizers=(opt, None), callbacks=callbacks)
            trainer.train()
        logs.append([(e["grad_norm"], e["loss"]) for e in trainer.state.log_history
                     if "grad_norm" in e])
    assert len(logs[0]) == 4
    assert logs[0] == logs[1]
    _equal_state(model.state_dict(), plain.state_dict())


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


def _small(seed=0, per_element_decay=False):
    """Every part layout; ``1.weight``'s regions differ only in weight_decay: a mask of parts, or
    with ``per_element_decay`` kept whole (the decay layout)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 30))
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(3)) < 0.5
    spec = {"0": rows({(0, 20): FROZEN}),
            "1": Regions(mask, {True: {"weight_decay": 0.0}, False: {"weight_decay": 0.2}}),
            "1.bias": Regions(torch.arange(8) % 2 == 0, {True: {"lr": 0.5}, False: {}}),
            "3": paramsplit.cols({(0, 4): {"lr": 0.5}})}
    out = paramsplit.split(model, spec, per_element_decay=per_element_decay)
    assert {line.split()[-1] for line in paramsplit.describe(model).splitlines()[1:]} == \
        ({"rows", "mask", "cols", "decay"} if per_element_decay else {"rows", "mask", "cols"})
    return out


def _small_decay(seed=0):
    return _small(seed, per_element_decay=True)


def _small_sparse(seed=0):
    """``_small`` with the Linear split by a mostly FROZEN mask (the sparse layout)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 30))
    sparse = torch.rand(8, 8, generator=torch.Generator().manual_seed(4)) < 0.2
    out = paramsplit.split(model, {"1": Regions(sparse, {True: {"weight_decay": 0.3},
                                                         False: FROZEN})})
    assert "sparse" in paramsplit.describe(model)
    return out


SMALL = {"rows-mask-cols": _small, "sparse": _small_sparse, "decay": _small_decay}


def _train(model, opt, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 30, (4, 5), generator=g)
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        opt.step()


@pytest.mark.parametrize("make", list(SMALL))
def test_safetensors_save_model_and_load_model_round_trip(tmp_path, make):
    from safetensors.torch import load_file, load_model, save_model

    model, groups = SMALL[make]()
    _train(model, torch.optim.AdamW(groups, lr=1e-2))
    save_model(model, str(tmp_path / "m.safetensors"))
    assert set(load_file(str(tmp_path / "m.safetensors"))) == set(model.state_dict())
    fresh, _ = SMALL[make](seed=3)
    missing, unexpected = load_model(fresh, str(tmp_path / "m.safetensors"))
    assert not missing and not unexpected
    _equal_state(fresh.state_dict(), model.state_dict())
    plain = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 30))
    missing, unexpected = load_model(plain, str(tmp_path / "m.safetensors"))  # plain format
    assert not missing and not unexpected
    _equal_state(plain.state_dict(), model.state_dict())


@pytest.mark.parametrize("make", list(SMALL))
def test_accelerate_save_state_and_load_state_round_trip(tmp_path, make):
    from accelerate import Accelerator

    model, groups = SMALL[make]()
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, torch.optim.AdamW(groups, lr=1e-2))
    _train(model, opt)
    acc.save_state(str(tmp_path / "state"))
    # the oracle: the same split continuing from the same weights and optimizer state
    reference, ref_groups = SMALL[make](seed=5)
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW(ref_groups, lr=1e-2)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))

    fresh, fresh_groups = SMALL[make](seed=9)
    acc = Accelerator(cpu=True)  # a new run
    fresh, fresh_opt = acc.prepare(fresh, torch.optim.AdamW(fresh_groups, lr=1e-2))
    acc.load_state(str(tmp_path / "state"))
    _equal_state(fresh.state_dict(), model.state_dict())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="paramsplit")
        _train(fresh, fresh_opt, seed=4)
        _train(reference, ref_opt, seed=4)
    _equal_state(fresh.state_dict(), reference.state_dict())
    frozen = {"rows-mask-cols": ("0.weight", (slice(0, 20),)), "sparse": None,
              "decay": ("0.weight", (slice(0, 20),))}[make]
    if frozen is not None:
        name, where = frozen
        assert torch.equal(fresh.state_dict()[name][where],
                           SMALL[make]()[0].state_dict()[name][where])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 30)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(self.emb(x))))


COPY = "base_model.model.emb.modules_to_save.default"


@pytest.mark.parametrize("key", ["*.modules_to_save.default", COPY, COPY + ".weight"])
def test_peft_lora_then_split_the_trainable_copy(key):
    """The recipe: wrap with PEFT first, then split the PEFT model, naming the trainable copy
    PEFT made of ``emb`` (``modules_to_save``). New tokens 20..29 train with their own decay, the
    old ones are FROZEN; LoRA adapts ``proj``. Oracle: the same PEFT model trained by a plain
    AdamW, the copy's FROZEN rows put back after each step."""
    peft = pytest.importorskip("peft")

    def wrapped():
        torch.manual_seed(0)
        config = peft.LoraConfig(r=2, target_modules=["proj"], modules_to_save=["emb"])
        return peft.get_peft_model(_Net(), config)

    model, ref = wrapped(), wrapped()
    plan = rows({(0, 20): FROZEN, (20, None): {"weight_decay": 0.5}})
    split_model, groups = paramsplit.split(model, {key: plan})
    assert split_model is model
    assert f"{COPY}.weight" in paramsplit.describe(model)
    names = {id(p): n for n, p in model.named_parameters()}
    held = {g["name"]: [names.get(id(p), "a part") for p in g["params"]] for g in groups}
    assert held["weight_decay=0.5"] == ["a part", f"{COPY}.weight"]
    assert held["default"] and all("lora_" in n for n in held["default"])

    ref_copy = ref.base_model.model.emb.modules_to_save["default"].weight
    ref_opt = torch.optim.AdamW(
        [{"params": [p for n, p in ref.named_parameters() if "lora_" in n]},
         {"params": [ref_copy], "weight_decay": 0.5}], lr=1e-2)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="paramsplit")
        for _ in range(3):
            x = torch.randint(0, 30, (4, 5), generator=g)
            for m, o in ((model, opt), (ref, ref_opt)):
                o.zero_grad()
                m(x).logsumexp(-1).mean().backward()
            frozen_rows = ref_copy.detach()[:20].clone()
            opt.step()
            ref_opt.step()
            with torch.no_grad():
                ref_copy[:20] = frozen_rows
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                assert torch.equal(p, q), n
    after = dict(model.named_parameters())
    trained = after[f"{COPY}.weight"].detach()
    assert torch.equal(trained[:20], before[f"{COPY}.weight"][:20])  # FROZEN rows unchanged
    assert (trained[20:] != before[f"{COPY}.weight"][20:]).all()  # trained rows changed
    lora = [n for n in after if "lora_" in n]
    assert lora and all(not torch.equal(after[n], before[n]) for n in lora)  # LoRA trains
    for n, p in after.items():
        if not p.requires_grad:  # the base weights, the original emb, the head: untouched
            assert torch.equal(p, before[n]), n
    assert torch.equal(after["base_model.model.emb.original_module.weight"],
                       before["base_model.model.emb.original_module.weight"])
    # the adapter saves in PEFT's own format, the copy's trained values included
    state = peft.get_peft_model_state_dict(model)
    assert torch.equal(state["base_model.model.emb.weight"], trained)


# -- PEFT on a model with tied input/output embeddings ---------------------------------------

OLD, VOCAB = 30, 40  # tokens 30..39 are new: they train, the old ones are FROZEN


def _tied_gpt2():
    """A GPT-2 built from a config, its ``lm_head.weight`` tied to ``wte.weight``; no dropout."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, tie_word_embeddings=True, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def _peft_gpt2(**config):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out for GPT-2's Conv1D, deprecations
        return peft.get_peft_model(_tied_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"],
                                                                 **config))


def _gpt2_batches(steps=3):
    """Each batch holds every token once (the input embedding's every row gets a gradient)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randperm(VOCAB, generator=g).reshape(4, VOCAB // 4) for _ in range(steps)]


def _gpt2_step(model, opt, ids):
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def _tied_recipe(modules=("wte", "lm_head")):
    """A new dict each time: PEFT rewrites the ``modules_to_save`` list it is given. PEFT
    knows GPT-2's tie through the name ``lm_head`` (``wte`` alone is not recognised)."""
    return {"modules_to_save": list(modules), "ensure_weight_tying": True}

TIED_COPY = "base_model.model.transformer.wte.modules_to_save.default"


@pytest.mark.parametrize("modules", [("wte", "lm_head"), ("lm_head",)], ids="+".join)
def test_peft_tied_embeddings_recipe_trains_the_rows_the_output_layer_uses(modules):
    """The recipe for tied embeddings: ``modules_to_save=["wte", "lm_head"]`` with
    ``ensure_weight_tying=True`` makes PEFT's trainable copies of both one tensor; split that
    tensor. New token rows train (their own options), the output layer computes with them, the
    old rows stay FROZEN, and the adapter saves and loads them. Oracle: the same PEFT model
    trained by a plain AdamW, its FROZEN rows put back after each step."""
    peft = pytest.importorskip("peft")
    model, ref = _peft_gpt2(**_tied_recipe(modules)), _peft_gpt2(**_tied_recipe(modules))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    copy_weight = emb.modules_to_save["default"].weight
    assert head.modules_to_save["default"].weight is copy_weight  # PEFT tied the copies
    plan = rows({(0, OLD): FROZEN, (OLD, None): {"weight_decay": 0.0}})
    _, groups = paramsplit.split(model, {"*.wte.modules_to_save.default": plan})
    assert f"{TIED_COPY}.weight" in paramsplit.describe(model)
    ref_copy = ref.get_input_embeddings().modules_to_save["default"].weight
    assert ref.get_output_embeddings().modules_to_save["default"].weight is ref_copy
    ref_opt = torch.optim.AdamW(
        [{"params": [p for n, p in ref.named_parameters() if "lora_" in n]},
         {"params": [ref_copy], "weight_decay": 0.0}], lr=1e-2)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    probe = torch.arange(16).reshape(2, 8) % VOCAB
    before = copy_weight.detach().clone()
    logits_before = model(input_ids=probe).logits.detach()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="paramsplit")
        for ids in _gpt2_batches():
            _gpt2_step(model, opt, ids)
            frozen_rows = ref_copy.detach()[:OLD].clone()
            _gpt2_step(ref, ref_opt, ids)
            with torch.no_grad():
                ref_copy[:OLD] = frozen_rows
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                assert torch.equal(p, q), n
    trained = copy_weight.detach()
    assert torch.equal(trained[:OLD], before[:OLD])  # FROZEN rows unchanged
    assert (trained[OLD:] != before[OLD:]).any(dim=1).all()  # every new row trained
    # the output layer is the trained tensor: its logits are the final hidden states times it
    out = model(input_ids=probe, output_hidden_states=True)
    hidden = out.hidden_states[-1].detach()
    assert head.modules_to_save["default"].weight is copy_weight
    assert torch.equal(out.logits, nn.functional.linear(hidden, trained))
    assert not torch.equal(out.logits[..., OLD:], nn.functional.linear(hidden, before)[..., OLD:])
    assert not torch.equal(out.logits, logits_before)
    # the adapter saves both names with the trained values, and loads back tied
    state = peft.get_peft_model_state_dict(model)
    assert torch.equal(state["base_model.model.transformer.wte.weight"], trained)
    assert torch.equal(state["base_model.model.lm_head.weight"], trained)
    fresh = _peft_gpt2(**_tied_recipe(modules))
    peft.set_peft_model_state_dict(fresh, state)
    fresh_copy = fresh.get_input_embeddings().modules_to_save["default"].weight
    assert fresh.get_output_embeddings().modules_to_save["default"].weight is fresh_copy
    assert torch.equal(fresh(input_ids=probe).logits, out.logits)


def test_peft_modules_to_save_of_the_input_embedding_alone_leaves_the_tied_head_behind():
    """Why the recipe above names ``lm_head`` too: with ``modules_to_save=["wte"]`` alone
    (the README's recipe in 0.3.0), PEFT trains a copy of the embedding, and the tied
    ``lm_head`` keeps computing with the original weight, so the trained new-token rows never
    reach the output layer."""
    model = _peft_gpt2(modules_to_save=["wte"])
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    copy_weight = emb.modules_to_save["default"].weight
    assert isinstance(head, nn.Linear) and head.weight is not copy_weight
    assert head.weight is emb.original_module.weight and not head.weight.requires_grad
    plan = rows({(0, OLD): FROZEN, (OLD, None): {"weight_decay": 0.0}})
    _, groups = paramsplit.split(model, {"*.wte.modules_to_save.default": plan})
    opt = torch.optim.AdamW(groups, lr=1e-2)
    head_before = head.weight.detach().clone()
    before = copy_weight.detach().clone()
    for ids in _gpt2_batches():
        _gpt2_step(model, opt, ids)
    assert (copy_weight[OLD:] != before[OLD:]).any(dim=1).all()  # the copy's new rows trained
    assert torch.equal(head.weight, head_before)  # ... the output layer never sees them
