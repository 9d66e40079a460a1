"""Peak memory and time of a full-vocabulary KL loss + backward: opd-ray's chunked path vs the naive one.

Naive: logits for all N response tokens at once (N x |V| for the student, again for the
teacher, plus log-softmaxes and their gradients). Chunked: `opd_ray.losses.objectives.chunked_loss`,
which applies the output head to `chunk` tokens at a time under activation checkpointing.
Both compute the same number; the table shows the loss ratio too.

Each (variant, size) runs in its own process, so a peak is that variant's alone: on CPU the
process's peak resident memory above what it held once the inputs existed; on CUDA
`max_memory_allocated` above the same point.

    python benchmarks/full_vocab_memory.py            # the default sizes, a table on stdout
    python benchmarks/full_vocab_memory.py --tokens 1024 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from opd_ray.losses.objectives import ObjectiveInputs, TokenBatch, chunked_loss, full_vocab_divergence
from opd_ray.spec import AlgorithmSpec

REVERSE_KL = AlgorithmSpec(objective="full_vocab", divergence="reverse_kl")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, device: str) -> dict:
    torch.manual_seed(0)  # the heads' initialisation: every variant must see the same weights
    generator = torch.Generator(device="cpu").manual_seed(0)
    student_head = torch.nn.Linear(hidden, vocab, bias=False).to(device)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False).to(device)
    hidden_NH = torch.randn(tokens, hidden, generator=generator).to(device).requires_grad_(True)
    teacher_hidden_NH = torch.randn(tokens, hidden, generator=generator).to(device)
    batch = TokenBatch(
        target_ids_N=torch.zeros(tokens, dtype=torch.long, device=device),
        rollout_logprobs_N=torch.zeros(tokens, device=device),
        token_weight_N=torch.full((tokens,), 1.0 / tokens, device=device),
    )
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resident_bytes()
    start = time.perf_counter()
    if variant == "naive":
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden_NH)
        inputs = ObjectiveInputs(student_head(hidden_NH), batch, teacher_logits)
        loss = (full_vocab_divergence(inputs, REVERSE_KL) * batch.token_weight_N).sum()
    else:
        loss = chunked_loss(hidden_NH, student_head, batch, REVERSE_KL, chunk, teacher_hidden_NH, teacher_head)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"seconds": time.perf_counter() - start, "peak_bytes": peak, "loss": float(loss)}


def measure(variant: str, args: argparse.Namespace, chunk: int) -> dict:
    """In a fresh process, so that one variant's peak cannot hide another's."""
    command = [
        sys.executable, __file__, "--one", variant, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
        "--hidden", str(args.hidden), "--chunk", str(chunk), "--device", args.device,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="response tokens in one learner rank's batch")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunks", default="512,2048", help="chunk sizes to compare with the naive loss")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--one", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(run_one(args.one, args.tokens, args.vocab, args.hidden, args.chunk, args.device)))
        return

    naive = measure("naive", args, 0)
    rows = [("naive (all tokens at once)", naive)]
    rows += [(f"chunked, {c} tokens", measure("chunked", args, c)) for c in map(int, args.chunks.split(","))]
    print(f"full-vocabulary reverse KL + backward | machine: {machine()} | torch {torch.__version__}")
    print(f"N = {args.tokens} tokens, |V| = {args.vocab}, hidden {args.hidden}, float32; one N x |V| tensor = "
          f"{args.tokens * args.vocab * 4 / 2**20:.0f} MiB")  # fmt: skip
    print("| variant | peak MiB | peak vs naive | seconds | time vs naive | loss / naive loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, result in rows:
        print(
            f"| {name} | {result['peak_bytes'] / 2**20:.0f} | {result['peak_bytes'] / naive['peak_bytes']:.3f} | "
            f"{result['seconds']:.2f} | {result['seconds'] / naive['seconds']:.2f} | "
            f"{result['loss'] / naive['loss']:.6f} |"
        )


if __name__ == "__main__":
    main()
