"""The quickstart's student under other token ids: the control for cross-tokenizer scoring.

The same weights, with the rows of its (tied) embedding reordered to match a tokenizer whose 15 tokens have
other ids: the same function of the text, another vocabulary. Distilled from the character teacher with
`cross_tokenizer: true`, every chunk is one-to-one and every teacher token has a match, so the run must do
what the quickstart does (docs/methods/cross-tokenizer.md).

    python examples/permuted_student.py            # writes .cache/opd-ray/student-permuted
    opd-ray train examples/cross_tokenizer.yaml run.name=cross_permuted \
        models.student.path=.cache/opd-ray/student-permuted
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_ray.recipe.tiny_models import SHIPPED, build_char_level_tokenizer


def permuted_student(source: Path, output: Path) -> list[int]:
    """Writes the model of `source` with its token ids reversed; returns new id -> old id."""
    old_ids = AutoTokenizer.from_pretrained(source).get_vocab()
    tokens = sorted(old_ids, key=lambda token: -old_ids[token])
    tokenizer = build_char_level_tokenizer({token: i for i, token in enumerate(tokens)}, output)
    model = AutoModelForCausalLM.from_pretrained(source)
    order = [old_ids[token] for token in tokens]
    with torch.no_grad():  # tied: the head's rows move with the embedding's
        embedding = model.get_input_embeddings().weight
        embedding.copy_(embedding[torch.tensor(order)].clone())
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return order


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/opd-ray/student-permuted")
    permuted_student(SHIPPED / "student", out)
    print(f"the quickstart's student under reversed token ids: {out}")
