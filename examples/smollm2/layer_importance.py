"""Which of the teacher's layers a pruned student can lose: the loss of the teacher's own answers with one
layer removed at a time (the "block influence" way practitioners pick layers to drop).

Run after the example has imported the teacher (or point it at any model folder):

    python examples/smollm2/layer_importance.py [MODEL_DIR] [--drop 6]

It answers 24 training prompts greedily with the teacher, then, for each decoder layer,
measures the mean token loss of those answers with that layer removed, and prints the layers
ordered from least to most important, and the loss with the `--drop` least important removed
together (the example's `student_layers` keeps the rest).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).parent
PROMPTS = 24


def teacher_answers(model, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, labels on the answer tokens only) of prompt + greedy answer."""
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    tokenizer.padding_side = "left"
    encoded = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**encoded, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    mask = (generated != tokenizer.pad_token_id).long()
    mask[:, : encoded.input_ids.shape[1]] = encoded.attention_mask
    labels = generated.masked_fill(mask == 0, -100)
    labels[:, : encoded.input_ids.shape[1]] = -100
    return generated, mask, labels


def loss_without(model, layers: list, removed: set[int], batch) -> float:
    model.model.layers = torch.nn.ModuleList([layer for i, layer in enumerate(layers) if i not in removed])
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(model.model.layers)
    ids, mask, labels = batch
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=".cache/opd-ray/smollm2/teacher")
    parser.add_argument("--drop", type=int, default=6)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    rows = [json.loads(line) for line in (HERE / "additions_train.jsonl").read_text().splitlines()[:PROMPTS]]
    batch = teacher_answers(model, tokenizer, [row["prompt"] for row in rows])
    layers = list(model.model.layers)
    print(f"all {len(layers)} layers: loss {loss_without(model, layers, set(), batch):.3f}")
    losses = {i: loss_without(model, layers, {i}, batch) for i in range(len(layers))}
    order = sorted(losses, key=losses.get)
    print("without one layer, least important first:")
    print("  " + ", ".join(f"{i}: {losses[i]:.3f}" for i in order))
    dropped = set(order[: args.drop])
    kept = [i for i in range(len(layers)) if i not in dropped]
    print(f"without layers {sorted(dropped)}: loss {loss_without(model, layers, dropped, batch):.3f}; keep {kept}")


if __name__ == "__main__":
    main()
