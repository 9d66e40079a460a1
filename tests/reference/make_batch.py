"""Writes the reference checks' batch: real vLLM samples of the shipped quickstart student, scored by the
shipped teacher (transformers backend: it also scores the student's top-k ids), saved as safetensors.

    .venv/bin/python -m tests.reference.make_batch    # rewrites tests/data/reference/batch.safetensors

The rollout worker and teacher run in this process (no Ray): the classes are the ones the roles start.
The batch is committed, so the reference tests need neither vLLM nor Ray; rerun this only when the
shipped models or the batch layout change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BATCH = REPO / "tests" / "data" / "reference" / "batch.safetensors"
STUDENT_TOP_K, TEACHER_TOP_K, SEED = 6, 6, 11
MAX_NEW_TOKENS = 4  # a 4-digit sum and its end-of-sequence do not fit: some rows are cut off
# sums of 2, 3 and 4 digits: responses of several lengths
PAIRS = [(12, 34), (21, 15), (40, 17), (150, 230), (315, 208), (122, 604), (480, 520), (999, 999), (777, 654),
         (45, 61), (230, 99), (860, 917)]  # fmt: skip


def main() -> None:
    from opd_ray.actors.vllm_engine import ENGINE_ENV

    os.environ.update(ENGINE_ENV)  # before vLLM is imported, as the roles set it on their actors
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from opd_ray.actors.rollout import RolloutWorker
    from opd_ray.actors.teacher import TeacherScorer
    from opd_ray.recipe.tiny_models import SHIPPED
    from opd_ray.spec import EngineSpec, ModelSpec, NamedTeacherSpec, RolloutSpec

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED / "student")
    prompts = [f"{a}+{b}=" for a, b in PAIRS]
    prompts_P = {i: tokenizer(p, add_special_tokens=False)["input_ids"] for i, p in enumerate(prompts)}
    engine = EngineSpec(max_model_len=32, kv_cache_gib=0.1)
    rollout = RolloutSpec(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0)
    worker = RolloutWorker(ModelSpec(path=str(SHIPPED / "student")), engine, rollout, SEED, student_top_k=STUDENT_TOP_K)
    batch, _ = worker.sample(prompts_P, SEED)
    teacher_model = ModelSpec(path=str(SHIPPED / "teacher"))
    teacher = NamedTeacherSpec(model=teacher_model, backend="transformers", top_k=TEACHER_TOP_K, engine=engine)
    scorer = TeacherScorer(teacher_model, teacher, SEED)
    scored, _ = scorer.score(batch)
    names = [
        "input_ids_BL", "attention_mask_BL", "response_mask_BL", "rollout_logprobs_BL", "student_topk_ids_BLK",
        "teacher_logprobs_BL", "teacher_topk_ids_BLK", "teacher_topk_logprobs_BLK",
        "teacher_logprobs_at_student_topk_BLK",
    ]  # fmt: skip
    tensors = {name: getattr(scored, name).contiguous() for name in names}
    BATCH.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, BATCH, metadata={"prompts": json.dumps(prompts), "seed": str(SEED)})
    print(f"wrote {BATCH.relative_to(REPO)}: {scored.num_sequences} rows, {scored.num_response_tokens} response tokens")


if __name__ == "__main__":
    main()
