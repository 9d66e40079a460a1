"""The learner's step at Qwen3-0.6B's shape: tokens/s, peak memory and model-FLOPs utilisation.

One learner step as opd-ray runs it (`opd_ray.losses.step.step_loss`: top-k reverse KL on the
teacher's top-16, diagnostics at k = 16, then backward and an AdamW step) on a random-init
model of Qwen3-0.6B's shape (hidden 1024, 28 layers, 16/8 heads, head_dim 128, 151,669-token
vocabulary, tied embeddings), without Ray or DeepSpeed: the numbers are the loss path's own.
Rows, each in a fresh process so peak memory is its own:

- no diagnostics: the loss alone (the baseline of the diagnostics' cost);
- diagnostics folded: the default; statistics and diagnostics read off the loss's head pass;
- diagnostics in a separate pass: what the learner did before (a no-grad head pass for them,
  then the loss under chunk checkpointing: three applications of the output head);
- each of those with activation checkpointing of the decoder layers (`learner.gradient_checkpointing`);
- diagnostics folded, with the rows split among 4 teachers: every metric also per teacher
  (`teacher/<name>/...`) and per-teacher loss coefficients, what a run with named teachers logs;
- diagnostics folded with a LoRA student (`learner.lora`, rank 16 on every linear layer): adapters
  alone train and hold AdamW state (its MFU is left out: without weight gradients 6 x P x T is wrong),
  with and without activation checkpointing.

MFU = model FLOPs (6 x parameters x tokens for the matmuls, + attention) per second over a
matmul ceiling measured in the same run (the best of large square matmuls in the step's dtype);
the recompute of checkpointing is not model FLOPs. On CUDA: bf16, the full shape, 4 x 8192 tokens.
On CPU: float32, 2 of the 28 layers and 2 x 256 tokens (the vocabulary stays whole: at this
vocabulary a small model is mostly output head).

    python benchmarks/learner.py               # CUDA if present, else the reduced CPU shape; recorded
    python benchmarks/learner.py --variant 2 --variant 6   # only those rows (the first is the baseline)
    python benchmarks/learner.py --tiny        # CI: a smaller shape, nothing recorded

A variant that runs out of memory is reported as such (a row without numbers), not retried.
"""

from __future__ import annotations

import multiprocessing
import time
from queue import Empty

import torch
from common import markdown_table, parse_args, report, target

QWEN3_0P6B = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151_669,
}
SHAPES = {  # name -> (config overrides, sequences, tokens per sequence, measured steps)
    "cuda": ({}, 4, 8192, 5),
    "cpu": ({"num_hidden_layers": 2}, 2, 256, 3),
    "tiny": (  # CI keeps the script working: every variant runs, at a size that takes seconds
        {"num_hidden_layers": 1, "hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "vocab_size": 4096},
        1,
        64,
        1,
    ),
}
PROMPT_TOKENS = 256  # per sequence (fewer in the smaller shapes); the rest is response
TOP_K = 16
LORA_RANK = 16
VARIANTS = [  # name, diagnostics, separate statistics pass, activation checkpointing, teachers, LoRA
    ("no diagnostics", False, False, False, 0, False),
    ("diagnostics folded (default)", True, False, False, 0, False),
    ("diagnostics in a separate pass (before)", True, True, False, 0, False),
    ("no diagnostics + activation checkpointing", False, False, True, 0, False),
    ("diagnostics folded + activation checkpointing", True, False, True, 0, False),
    ("diagnostics folded, 4 teachers (per-teacher metrics)", True, False, False, 4, False),
    (f"diagnostics folded, LoRA rank {LORA_RANK} on every linear layer", True, False, False, 0, True),
    (f"diagnostics folded + activation checkpointing, LoRA rank {LORA_RANK}", True, False, True, 0, True),
]


def random_model(overrides: dict, dtype: torch.dtype, device: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(**{**QWEN3_0P6B, **overrides}, tie_word_embeddings=True, max_position_embeddings=8192)
    return Qwen3ForCausalLM(config).to(device=device, dtype=dtype)


def scored_batch(sequences: int, length: int, vocab: int):
    """Random token ids with a teacher's top-16 (ids and log-probs) on every response token."""
    from opd_ray.losses.batch import ResponseRow, batch_from_rows

    generator = torch.Generator().manual_seed(0)
    prompt = min(PROMPT_TOKENS, length // 4)
    rows = []
    for b in range(sequences):
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        rows.append(ResponseRow(ids[:prompt], ids[prompt:], b, True, [-1.0] * (length - prompt)))
    batch = batch_from_rows(rows)
    shape = (*batch.input_ids_BL.shape, TOP_K)
    batch.teacher_topk_ids_BLK = torch.randint(0, vocab, shape, generator=generator)
    logprobs = torch.log_softmax(torch.randn(shape, generator=generator), -1).sort(-1, descending=True).values
    batch.teacher_topk_logprobs_BLK = logprobs
    batch.teacher_logprobs_BL = logprobs[..., 0]
    return batch


def old_step_loss(models, batch, algorithm, diagnostics_k):
    """The learner's step before the statistics were folded in: a separate no-grad head pass, then the
    loss with every chunk checkpointed (the recompute: a third head application)."""
    from opd_ray.losses.advantages import finish_token_batch
    from opd_ray.losses.hidden import response_hidden_states
    from opd_ray.losses.objectives import chunked_loss
    from opd_ray.losses.step import rank_share, token_statistics, values_pass, wanted_values

    share = rank_share(batch, algorithm, 0, 1, models.device)
    hidden_NH = response_hidden_states(models.student, share.batch, models.device)
    wanted = wanted_values(share.tokens, algorithm, diagnostics_k, True)
    per_token = values_pass(models, hidden_NH, share.tokens, wanted)
    metrics = token_statistics(per_token, share.tokens, True)
    tokens = finish_token_batch(share.tokens, per_token, share.mask_BT, algorithm)
    checkpointed_chunk = max(1, tokens.num_tokens - 1)  # > 1 chunk: the old path always checkpointed
    return chunked_loss(hidden_NH, models.student_head, tokens, algorithm, checkpointed_chunk), metrics


def measure(shape: str, variant: tuple, queue) -> None:
    """One variant in its own process: warm-up step, then the mean of the measured steps; peak memory."""
    import resource

    from opd_ray.actors.lora import trainable_parameters, with_lora
    from opd_ray.losses.step import StepModels
    from opd_ray.spec import AlgorithmSpec, LoraSpec

    name, diagnostics, separate, checkpointing, teachers, lora = variant
    overrides, sequences, length, steps = SHAPES[shape]
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    model = random_model(overrides, dtype, device).train()
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:  # as the learner wraps it: adapters alone train and hold optimizer state
        model = with_lora(model, LoraSpec(rank=LORA_RANK, alpha=2 * LORA_RANK))
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-5)
    batch = scored_batch(sequences, length, model.config.vocab_size)
    names = tuple(f"teacher{i}" for i in range(teachers))
    if teachers:  # rows dealt out to the teachers, as their scorers mark them
        batch.teacher_id_B = torch.arange(sequences) % teachers
        batch.teacher_coef_B = 1.0 + batch.teacher_id_B.float()
    models = StepModels(model, model.get_output_embeddings(), device, chunk_tokens=8192)
    algorithm = AlgorithmSpec(objective="topk", top_k=TOP_K)
    k = TOP_K if diagnostics else None
    times = []
    try:
        run_steps(models, batch, algorithm, k, names, separate, optimizer, steps, times)
    except torch.OutOfMemoryError:
        queue.put((name, None, torch.cuda.max_memory_allocated() / 2**30, 0, sequences * length, model.config))
        return
    if on_gpu:
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, whole process
    parameters = sum(p.numel() for p in model.parameters())
    queue.put((name, sum(times) / len(times), peak_gib, parameters, sequences * length, model.config))


def run_steps(models, batch, algorithm, k, names, separate: bool, optimizer, steps: int, times: list) -> None:
    """A warm-up step, then `steps` timed ones (appended to `times`)."""
    from opd_ray.losses.step import step_loss

    on_gpu = torch.cuda.is_available()
    for step in range(steps + 1):  # the first is warm-up
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        if separate:
            loss, _ = old_step_loss(models, batch, algorithm, k)
        else:
            loss, _ = step_loss(models, batch, algorithm, 0, 1, k, teacher_names=names)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - started)


def model_flops(parameters: int, tokens: int, sequence: int, config) -> float:
    """6 N per token for forward + backward matmuls, plus attention's 12 L H T per token (causal: half)."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * sequence / 2
    return (6 * parameters + attention) * tokens


def matmul_ceiling(on_gpu: bool, tiny: bool = False) -> float:
    """Best FLOP/s of large square matmuls in the step's dtype: the roof MFU is measured against."""
    device, dtype, size = ("cuda", torch.bfloat16, 8192) if on_gpu else ("cpu", torch.float32, 1024 if tiny else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if on_gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


class _Collected(list):
    put = list.append


def run_variant(shape: str, variant: tuple) -> tuple:
    """In a fresh process, so that peak memory is the variant's own; `--tiny` (CI) runs in this one."""
    if shape == "tiny":
        collected = _Collected()
        measure(shape, variant, collected)
        return collected[0]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(shape, variant, queue))
    process.start()
    while True:  # a variant whose process dies (killed for memory, a crash) ends the wait at once
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not process.is_alive():
                return (variant[0], None, None, 0, 0, None)
    process.join(timeout=60)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv, variants=len(VARIANTS))
    on_gpu = torch.cuda.is_available()
    shape = "tiny" if args.tiny else ("cuda" if on_gpu else "cpu")
    ceiling = matmul_ceiling(on_gpu, args.tiny)
    chosen = [VARIANTS[i - 1] for i in args.variant] if args.variant else VARIANTS
    results = {variant[0]: run_variant(shape, variant) for variant in chosen}
    baseline_name = chosen[0][0]
    baseline = results[baseline_name][1]
    rows = []
    for name, seconds, peak_gib, parameters, tokens, config in results.values():
        if seconds is None:
            rows.append([name, "out of memory", "-", "-", "-" if peak_gib is None else peak_gib, "-"])
            continue
        flops = model_flops(parameters, tokens, SHAPES[shape][2], config)
        mfu = "-" if "LoRA" in name else flops / seconds / ceiling  # no weight gradients: 6 x P x T does not hold
        rows.append([name, seconds, tokens / seconds, seconds / baseline, peak_gib, mfu])
    header = ["learner step", "seconds", "tokens/s", f"vs {baseline_name}", "peak memory GiB", "MFU"]
    overrides, sequences, length, steps = SHAPES[shape]
    parameters = next(r[3] for r in results.values() if r[1] is not None)
    config = (
        f"Qwen3-0.6B shape ({QWEN3_0P6B | overrides}), {parameters / 1e6:.0f}M parameters, random init; "
        f"{sequences} x {length} tokens ({min(PROMPT_TOKENS, length // 4)} prompt each), top-k reverse KL on the "
        f"teacher's top-{TOP_K}, AdamW; {'bf16' if on_gpu else 'float32'}; mean of {steps} steps after one "
        f"warm-up; matmul ceiling {ceiling / 1e12:.2f} TFLOP/s; peak memory: "
        + ("CUDA allocated" if on_gpu else "the process's peak RSS")
    )
    report("learner", config, markdown_table(header, rows), verdicts(results), record=not args.tiny)


def verdicts(results: dict) -> list[str]:
    """The targets whose rows were measured."""
    seconds = {name: r[1] for name, r in results.items()}
    plain, folded, separate, _, folded_checkpointed, per_teacher, lora, lora_checkpointed = (
        seconds.get(v[0]) for v in VARIANTS
    )
    out = []
    if plain and folded:
        out.append(target(folded / plain - 1 <= 0.05, "diagnostics <= 5% of the learner's time"))
    if folded and separate:
        out.append(
            f"folding the diagnostics into the loss pass: {separate / folded:.2f}x faster than the separate pass"
        )
    if folded and lora:
        out.append(f"a LoRA student's step: {folded / lora:.2f}x the speed of training every weight")
    if folded_checkpointed and lora_checkpointed:
        out.append(
            f"with activation checkpointing, a LoRA student's step: {folded_checkpointed / lora_checkpointed:.2f}x"
        )
    if folded and per_teacher:
        out.append(target(per_teacher / folded - 1 <= 0.02, "per-teacher metrics of 4 teachers <= 2% of the step"))
    return out


if __name__ == "__main__":
    main()
