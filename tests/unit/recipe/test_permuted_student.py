"""examples/permuted_student.py: the quickstart's student under other ids computes the same function of the text."""

from __future__ import annotations

import importlib.util

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_ray.recipe.tiny_models import SHIPPED
from tests.conftest import REPO


def test_the_permuted_student_gives_the_same_log_probs_to_the_same_text(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("permuted_student", REPO / "examples" / "permuted_student.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    order = module.permuted_student(SHIPPED / "student", tmp_path)
    assert order != sorted(order)  # other ids
    text = "147+592=937"
    logprobs = []
    for directory in (SHIPPED / "student", tmp_path):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        logprobs.append(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0])
    torch.testing.assert_close(logprobs[0], logprobs[1], rtol=1e-5, atol=1e-5)
