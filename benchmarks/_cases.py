"""The benchmarked models: what is built, which weights are split, the inputs and the loss.

A :class:`Case` is plain data (it travels to the memory probe's subprocesses as JSON). Kinds:

* ``linear``    ``nn.Linear(in, out)``; the weight is split; loss = MSE to a random target.
* ``gpt2``      ``GPT2LMHeadModel`` from a ``GPT2Config`` (random weights, nothing downloaded);
                every 2-D weight of the blocks (``transformer.h.*``) is split; loss = LM loss.
* ``generate``  the same kind of GPT-2; the "step" is ``model.generate(input_ids,
                max_new_tokens=..., do_sample=False)`` (no optimizer).
* ``sparse``    sparse fine-tuning (project issue 12): the same ``nn.Linear`` as ``linear``, its
                weight trained on a random 1% or 10% of the elements and frozen elsewhere, set
                against full fine-tuning (``_variants``: the ``sparse`` group).
* ``many``      many small weights: a 12-layer GPT-2 with ``n_embd=64`` (``n_head=4``,
                ``n_positions=64``, vocab 1000), batch 2 x 32 tokens, one torch thread
                (``Case.threads``); its 48 block weights (``attn.c_attn``, ``attn.c_proj``,
                ``mlp.c_fc``, ``mlp.c_proj`` of every layer) are split. A step there is mostly
                per-tensor overhead (Python, kernel launches, the optimizer's per-parameter loop),
                which is what a split adds per weight; loss = LM loss.
* ``gpt124m``   GPT-2 124M: ``GPT2LMHeadModel`` with ``GPT2Config()``'s sizes (``n_layer=12``,
                ``n_embd=768``, ``n_head=12``, vocab 50257, ``n_positions=1024``; random weights
                from a seed, nothing downloaded), batch 8 x 512 tokens, forward and loss under
                ``torch.autocast(device type, dtype=torch.bfloat16)`` (``Case.autocast``), one
                table per AdamW implementation: ``AdamW(..., fused=True)`` and ``(...,
                foreach=True)`` (``Case.adamw``); its 48 block weights are split as in ``gpt2``;
                loss = LM loss. Meant for ``--device cuda`` (``benchmarks/gpu_check.sh``); on the
                CPU it runs only when asked for (``--models gpt124m``), usually with ``--quick``
                (``GPT124M_QUICK``: 2 layers of ``n_embd=64``, ``n_head=4``, ``n_positions=16``,
                vocab 500, batch 2 x 16 tokens, the same autocast and AdamW implementations).

The other tables run AdamW's default implementation (``Case.adamw`` None: on the CPU, its for-loop
one) without autocast (``Case.autocast`` None).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Case:
    kind: str  # "linear" | "gpt2" | "generate" | "sparse" | "many" | "gpt124m"
    sizes: dict[str, int]
    batches: tuple[int, ...]
    seq: dict[int, int]  # gpt2/many/gpt124m: batch -> training sequence length; generate: prompt
    threads: int | None = None  # torch.set_num_threads for this case (None: the run's setting)
    #: a torch dtype's name ("bfloat16"): forward + loss run under ``torch.autocast(device type,
    #: dtype)``; None: no autocast
    autocast: str | None = None
    #: "fused" or "foreach": ``AdamW(..., fused=True)`` / ``(..., foreach=True)``; None: AdamW's
    #: default implementation
    adamw: str | None = None

    def __post_init__(self) -> None:
        if self.adamw not in (None, *ADAMW_IMPLS):
            raise ValueError(f"Case.adamw: {self.adamw!r} is not one of {ADAMW_IMPLS}")
        if self.autocast is not None and not isinstance(getattr(torch, self.autocast, None),
                                                        torch.dtype):
            raise ValueError(f"Case.autocast: {self.autocast!r} is not a torch dtype")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "sizes": self.sizes, "batches": list(self.batches),
                "seq": {str(k): v for k, v in self.seq.items()}, "threads": self.threads,
                "autocast": self.autocast, "adamw": self.adamw}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Case:
        return Case(d["kind"], d["sizes"], tuple(d["batches"]),
                    {int(k): v for k, v in d["seq"].items()}, d.get("threads"),
                    d.get("autocast"), d.get("adamw"))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.autocast is None else getattr(torch, self.autocast)

    def adamw_kwargs(self) -> dict[str, bool]:
        """``{"fused": True}``, ``{"foreach": True}`` or ``{}`` (AdamW's default)."""
        return {self.adamw: True} if self.adamw else {}

    @property
    def is_linear(self) -> bool:
        """An ``nn.Linear`` model (the ``linear`` and ``sparse`` tables)."""
        return self.kind in ("linear", "sparse")

    def label(self) -> str:
        s = self.sizes
        if self.kind == "linear":
            return f"nn.Linear({s['in']}, {s['out']})"
        if self.kind == "sparse":
            return f"sparse fine-tuning, nn.Linear({s['in']}, {s['out']})"
        gpt = f"GPT-2 n_layer={s['n_layer']} n_embd={s['n_embd']} vocab={s['vocab']}"
        if self.kind == "many":
            return f"many small weights, {gpt}"
        if self.kind == "generate":
            return f"generate(max_new_tokens={s['new_tokens']}, do_sample=False), {gpt}"
        return gpt + self._training()

    def _training(self) -> str:
        """``", bf16 autocast, AdamW(fused=True)"``: what differs from the default step."""
        out = ""
        if self.autocast:
            out += f", {_SHORT_DTYPES.get(self.autocast, self.autocast)} autocast"
        if self.adamw:
            out += f", AdamW({self.adamw}=True)"
        return out

    @property
    def needs_transformers(self) -> bool:
        return not self.is_linear


ADAMW_IMPLS = ("fused", "foreach")
_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}


def _gpt(n_layer: int, n_embd: int, vocab: int, n_head: int | None = None) -> dict[str, int]:
    return {"n_layer": n_layer, "n_embd": n_embd,
            "n_head": n_head or (4 if n_embd >= 128 else 2), "vocab": vocab}


#: The ``many`` table: 12 layers of n_embd 64 (48 split weights, from 64 x 64 to 256 x 64 elements:
#: Conv1D), 2 x 32 tokens, one thread. The same in --quick (it is small already).
MANY = Case("many", {**_gpt(12, 64, 1000, n_head=4), "n_positions": 64}, (2,), {2: 32}, threads=1)

#: The ``gpt124m`` tables: ``GPT2Config()``'s sizes (GPT-2 124M), batch 8 x 512 tokens, bf16
#: autocast, one table per AdamW implementation (every ratio is taken within one table).
GPT124M = tuple(Case("gpt124m", {**_gpt(12, 768, 50257, n_head=12), "n_positions": 1024}, (8,),
                     {8: 512}, autocast="bfloat16", adamw=impl) for impl in ADAMW_IMPLS)
#: ... and their --quick version: 2 layers of n_embd 64, vocab 500, batch 2 x 16 tokens.
GPT124M_QUICK = tuple(Case("gpt124m", {**_gpt(2, 64, 500, n_head=4), "n_positions": 16}, (2,),
                           {2: 16}, autocast="bfloat16", adamw=impl) for impl in ADAMW_IMPLS)


FULL_CASES = (
    Case("linear", {"in": 1024, "out": 4096}, (8, 128, 2048), {}),
    # batch 128 and 2048 at sequence length 64 take seconds per step on 2 cores, so the sequence
    # is shortened there (tokens per step: 512, 2048, 4096).
    Case("gpt2", _gpt(2, 256, 8000), (8, 128, 2048), {8: 64, 128: 16, 2048: 2}),
    Case("generate", {**_gpt(2, 128, 1000), "new_tokens": 32}, (1, 8), {1: 8, 8: 8}),
    Case("sparse", {"in": 1024, "out": 4096}, (8, 128, 2048), {}),
    MANY,
    *GPT124M,
)
QUICK_CASES = (
    Case("linear", {"in": 128, "out": 512}, (8, 64), {}),
    Case("gpt2", _gpt(1, 64, 500), (4,), {4: 8}),  # tensors above the mmap threshold
    Case("generate", {**_gpt(1, 64, 500), "new_tokens": 8}, (2,), {2: 4}),
    Case("sparse", {"in": 128, "out": 512}, (8, 64), {}),
    MANY,
    *GPT124M_QUICK,
)
#: Per kind, a tiny case that the memory probe runs first, to pay lazy initialisation (with the
#: measured case's autocast and AdamW implementation: :func:`tiny_of`).
TINY_CASES = {
    "linear": Case("linear", {"in": 16, "out": 32}, (2,), {}),
    "gpt2": Case("gpt2", _gpt(1, 32, 64), (2,), {2: 4}),
    "generate": Case("generate", {**_gpt(1, 32, 64), "new_tokens": 2}, (1,), {1: 2}),
    "sparse": Case("sparse", {"in": 16, "out": 32}, (2,), {}),
    "many": Case("many", {**_gpt(2, 32, 64, n_head=4), "n_positions": 8}, (2,), {2: 4}, threads=1),
    "gpt124m": Case("gpt124m", {**_gpt(1, 32, 64, n_head=2), "n_positions": 8}, (2,), {2: 4}),
}


def tiny_of(case: Case) -> Case:
    """The tiny case of ``case``'s kind, stepped as ``case`` is (autocast, AdamW)."""
    return replace(TINY_CASES[case.kind], autocast=case.autocast, adamw=case.adamw)


def have_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def have_peft() -> bool:
    """Whether PEFT's SHiRA (``peft.ShiraConfig``, PEFT >= 0.17) can be used."""
    if importlib.util.find_spec("peft") is None:
        return False
    try:
        version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (int(x) if x.isdigit() else 0 for x in (version.split(".") + ["0"])[:2])
    return (major, minor) >= (0, 17)


def build_base(case: Case) -> nn.Module:
    """The unsplit model, on the CPU, with the same weights every time."""
    torch.manual_seed(0)
    if case.is_linear:
        return nn.Linear(case.sizes["in"], case.sizes["out"])
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    s = case.sizes
    training = case.kind != "generate"
    cfg = GPT2Config(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"],
                     vocab_size=s["vocab"], use_cache=not training,
                     n_positions=s.get("n_positions",
                                       max(case.seq.values()) + s.get("new_tokens", 0)),
                     bos_token_id=None, eos_token_id=None)  # no early stop: always new_tokens
    model = GPT2LMHeadModel(cfg)
    return model if training else model.eval()


def target_names(case: Case, model: nn.Module) -> list[str]:
    """The parameters every split variant splits (and the alternatives treat)."""
    if case.is_linear:
        return ["weight"]
    return [n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]


def make_inputs(case: Case, batch: int, device: torch.device) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    if case.is_linear:
        x = torch.randn(batch, case.sizes["in"], generator=g)
        y = torch.randn(batch, case.sizes["out"], generator=g)
        return x.to(device), y.to(device)
    ids = torch.randint(0, case.sizes["vocab"], (batch, case.seq[batch]), generator=g).to(device)
    return (ids,) if case.kind == "generate" else (ids, ids)


def task_loss(case: Case, model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    if case.is_linear:
        return F.mse_loss(model(inputs[0]), inputs[1])
    return model(input_ids=inputs[0], labels=inputs[1], use_cache=False).loss


def generate(case: Case, model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    ids = inputs[0]
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0,
                          max_new_tokens=case.sizes["new_tokens"], do_sample=False)


def preload(cases: list[Case]) -> None:
    """Import what building ``cases`` imports (before the memory probe forks its server)."""
    if any(c.needs_transformers for c in cases):
        import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    if any(c.kind == "sparse" for c in cases) and have_peft():
        import peft.tuners.shira  # noqa: F401
