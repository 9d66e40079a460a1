"""Bytes per response token that cross the object store from the teacher to the learners.

opd-ray's teacher returns, per response token, the sampled token's log-prob and its top-k
(ids and log-probs) inside a `RolloutBatch`. The baseline is what a framework that ships the
teacher's full distribution would move: |V| log-probs per token. Both are measured as the
serialized size of a real scored batch (pickle protocol 5, tensors in band: what Ray's
serializer stores, give or take a header), divided by the batch's response tokens.

    python benchmarks/teacher_payload.py            # k = 16 and 32; |V| = 32000, SmolLM2's 49152, Qwen3's 151669
    python benchmarks/teacher_payload.py --tiny     # CI: small sizes, nothing recorded
"""

from __future__ import annotations

import pickle

import torch
from common import markdown_table, parse_args, report

from opd_ray.losses.batch import RolloutBatch


def scored_batch(sequences: int, prompt_len: int, response_len: int, top_k: int) -> RolloutBatch:
    """A batch as the teacher returns it: `top_k` teacher candidates at every position."""
    length = prompt_len + response_len
    response_mask_BL = torch.zeros(sequences, length)
    response_mask_BL[:, prompt_len:] = 1
    return RolloutBatch(
        input_ids_BL=torch.randint(0, 1000, (sequences, length)),
        attention_mask_BL=torch.ones(sequences, length, dtype=torch.long),
        response_mask_BL=response_mask_BL,
        rollout_logprobs_BL=torch.randn(sequences, length),
        prompt_index_B=torch.arange(sequences),
        finished_B=torch.ones(sequences, dtype=torch.bool),
        weight_version=0,
        teacher_logprobs_BL=torch.randn(sequences, length),
        teacher_topk_ids_BLK=torch.randint(0, 1000, (sequences, length, top_k)),
        teacher_topk_logprobs_BLK=torch.randn(sequences, length, top_k),
    )


def bytes_per_token(batch: RolloutBatch) -> float:
    return len(pickle.dumps(batch, protocol=5)) / batch.num_response_tokens


def full_distribution_bytes_per_token(batch: RolloutBatch, vocab: int) -> float:
    """The same batch with the teacher's full log-prob vector (float32) instead of its top-k."""
    without_topk = RolloutBatch(**{**batch.__dict__, "teacher_topk_ids_BLK": None, "teacher_topk_logprobs_BLK": None})
    full = torch.empty(batch.input_ids_BL.shape[0], batch.input_ids_BL.shape[1], vocab)
    return (
        len(pickle.dumps(without_topk, protocol=5)) + len(pickle.dumps(full, protocol=5))
    ) / batch.num_response_tokens


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    sequences, prompt_len, response_len = (4, 8, 8) if args.tiny else (4, 128, 512)  # bytes per token: 4 suffice
    ks, vocabs = ((4,), (1000,)) if args.tiny else ((16, 32), (32000, 49152, 151669))

    rows, ratios = [], []
    for vocab in vocabs:
        full = full_distribution_bytes_per_token(scored_batch(sequences, prompt_len, response_len, 1), vocab)
        rows.append([f"full distribution, V = {vocab}", "—", f"{full:.0f}", 1.0])
        for k in ks:
            topk = bytes_per_token(scored_batch(sequences, prompt_len, response_len, k))
            rows.append([f"opd-ray top-k, V = {vocab}", k, f"{topk:.0f}", topk / full])
            ratios.append(topk / full)
    table = markdown_table(["payload", "k", "bytes / response token", "vs full distribution"], rows)
    config = (
        f"{sequences} sequences x ({prompt_len} prompt + {response_len} response) tokens; float32 log-probs, "
        "int64 ids; serialized RolloutBatch (pickle protocol 5)"
    )
    report(
        "teacher_payload",
        config,
        table,
        [f"the top-k payload is {min(ratios):.2%}-{max(ratios):.2%} of the full distribution's (no target set)"],
        record=not args.tiny,
    )


if __name__ == "__main__":
    main()
