"""Train only the embeddings of newly added tokens of a GPT-2 model.

A small GPT-2 is built from a config (no download), its vocabulary grows by 100 tokens, and
``transformer.wte`` is split by rows: the old rows are FROZEN, the new rows train. GPT-2 ties
``lm_head.weight`` to ``transformer.wte.weight``; ``split`` leaves the model as it is (it returns
the same object), so the tie stays and the output layer sees the same (partly frozen) matrix.
Everything except the embedding matrix trains as usual.

Run: ``python examples/gpt2_new_tokens.py``
"""

from __future__ import annotations

import torch
import transformers

import paramsplit

OLD_VOCAB = 1000
NEW_TOKENS = 100


def main() -> None:
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                     vocab_size=OLD_VOCAB, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    model.resize_token_embeddings(OLD_VOCAB + NEW_TOKENS)
    vocab = model.get_input_embeddings().weight.shape[0]
    assert vocab == OLD_VOCAB + NEW_TOKENS

    model, groups = paramsplit.split(
        model, {"transformer.wte": paramsplit.rows({(0, OLD_VOCAB): paramsplit.FROZEN,
                                                    (OLD_VOCAB, None): {"weight_decay": 0.0}})})
    print(paramsplit.describe(model))

    wte = model.transformer.wte
    before = wte.weight.detach().clone()
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)

    model.train()
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        # random sequences that use old and new tokens
        ids = torch.randint(0, vocab, (4, 16), generator=g)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")

    after = wte.weight.detach()
    assert torch.equal(after[:OLD_VOCAB], before[:OLD_VOCAB]), "old rows changed"
    changed = (after[OLD_VOCAB:] != before[OLD_VOCAB:]).any(dim=1)
    assert changed.all(), "some new rows did not train"
    assert model.lm_head.weight is wte.weight, "lm_head is no longer tied to wte"

    # the trained weights: the model's own state dict, loadable into a plain GPT-2
    plain = transformers.GPT2LMHeadModel(config)
    plain.resize_token_embeddings(vocab)
    plain.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, vocab, (2, 8), generator=g)
    with torch.no_grad():
        assert torch.equal(plain.eval()(ids).logits, model.eval()(ids).logits)

    print(f"old rows unchanged: {OLD_VOCAB} rows bitwise equal after {step + 1} AdamW steps")
    print(f"new rows changed: {int(changed.sum())}/{NEW_TOKENS}, mean |update| "
          f"{(after[OLD_VOCAB:] - before[OLD_VOCAB:]).abs().mean().item():.2e}")
    print("model.state_dict() loads into a plain GPT-2 with the same outputs: ok")


if __name__ == "__main__":
    main()
