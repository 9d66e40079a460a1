"""From a batch of scored rollouts to the flat `TokenBatch` an objective sees.

Some per-token quantities need more than one chunk of tokens: returns and standardisation
need the whole batch (computed before the batch is split across ranks), IW-OPD weights need
whole sequences, the entropy gate needs the spread of entropies over many tokens. They are
assembled here, once per step, so every objective stays a function of one chunk.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from opd_ray.losses.batch import RolloutBatch
from opd_ray.losses.diagnostics import position_buckets
from opd_ray.losses.objectives import TokenBatch
from opd_ray.spec import AlgorithmSpec, EntropyGateSpec


def reverse_kl_advantages(
    teacher_logprobs_BT: torch.Tensor,
    rollout_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    discount: float = 0.0,
    standardize: bool = False,
) -> torch.Tensor:
    """Advantages from the dense reward r_t = log q(y_t) - log p_old(y_t) on response tokens.

    discount 0 uses r_t itself (the paper's and tinker's choice); discount g > 0 uses the
    return sum_{s>=t} g^(s-t) r_s, which a trial saw collapse to empty answers at g = 1 because
    every reward is negative. `standardize` rescales to zero mean, unit variance over the batch.
    """
    reward_BT = (teacher_logprobs_BT - rollout_logprobs_BT).detach() * mask_BT
    advantage_BT = reward_BT
    if discount > 0:
        advantage_BT = torch.zeros_like(reward_BT)
        running_B = torch.zeros_like(reward_BT[:, 0])
        for t in range(reward_BT.shape[1] - 1, -1, -1):
            running_B = reward_BT[:, t] + discount * running_B
            advantage_BT[:, t] = running_B
        advantage_BT = advantage_BT * mask_BT
    if standardize:
        count = mask_BT.sum().clamp(min=1)
        mean = advantage_BT.sum() / count
        variance = (((advantage_BT - mean) * mask_BT) ** 2).sum() / count
        advantage_BT = (advantage_BT - mean) / torch.sqrt(variance + 1e-8) * mask_BT
    return advantage_BT


def centred_task_rewards(rewards_B: torch.Tensor, prompt_index_B: torch.Tensor) -> torch.Tensor:
    """Verifier reward minus the mean over the same prompt's samples (GRPO-style), or over the batch
    when every prompt has one sample: an uncentred 0/1 reward would push every sequence up."""
    groups = prompt_index_B.unique()
    if len(groups) == len(prompt_index_B):
        return rewards_B - rewards_B.mean()
    centred_B = torch.empty_like(rewards_B)
    for group in groups:
        in_group = prompt_index_B == group
        centred_B[in_group] = rewards_B[in_group] - rewards_B[in_group].mean()
    return centred_B


def position_weights(advantage_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """IW-OPD: w_t = 1 + gamma (1 - sum_{k<t}|A_k| / sum_k |A_k|), per sequence.

    Early tokens, before most of a response's disagreement with the teacher has happened,
    weigh up to 1 + gamma; the last weigh about 1.
    """
    magnitude_BT = advantage_BT.abs() * mask_BT
    before_BT = magnitude_BT.cumsum(-1) - magnitude_BT
    total_B1 = magnitude_BT.sum(-1, keepdim=True).clamp(min=1e-12)
    return (1 + gamma * (1 - before_BT / total_B1)) * mask_BT


def entropy_gate_keep(
    student_entropy_N: torch.Tensor, teacher_entropy_N: torch.Tensor, gate: EntropyGateSpec
) -> torch.Tensor:
    """1 for tokens that keep their gradient, 0 for gated ones (SEAD-style entropy zones).

    Mastered: both models at or below their `mastered_percentile` entropy (confident and, on
    student-visited states, nearly always agreeing): redundant. Teacher-uncertain: the
    teacher's entropy at or above `teacher_uncertain_percentile`: a noisy target.
    """
    keep_N = torch.ones_like(student_entropy_N, dtype=torch.bool)
    if student_entropy_N.numel() == 0:
        return keep_N.float()
    if gate.mastered_percentile is not None:
        q = gate.mastered_percentile / 100
        mastered_N = (student_entropy_N <= student_entropy_N.quantile(q)) & (
            teacher_entropy_N <= teacher_entropy_N.quantile(q)
        )
        keep_N &= ~mastered_N
    if gate.teacher_uncertain_percentile is not None:
        keep_N &= teacher_entropy_N < teacher_entropy_N.quantile(gate.teacher_uncertain_percentile / 100)
    return keep_N.float()


def with_batch_statistics(full: RolloutBatch, algorithm: AlgorithmSpec) -> RolloutBatch:
    """What needs every rank's rows: returns/standardised rewards and centred task rewards."""
    updates = {}
    if algorithm.record.sequence_advantages and full.teacher_logprobs_BL is not None:
        updates["advantages_BL"] = reverse_kl_advantages(
            full.teacher_logprobs_BL,
            full.rollout_logprobs_BL,
            full.response_mask_BL,
            algorithm.discount,
            algorithm.standardize_rewards,
        )
    if algorithm.task_reward_coef > 0 and full.task_rewards_B is not None:
        updates["task_advantages_B"] = centred_task_rewards(full.task_rewards_B, full.prompt_index_B)
    return replace(full, **updates)


def flatten_tokens(batch: RolloutBatch, weights_BT: torch.Tensor, device: torch.device | str) -> TokenBatch:
    """Response tokens of a shard, target-aligned (position i-1 predicts token i), in one flat axis."""
    mask_BT = batch.response_mask_BL[:, 1:].bool()

    def flat(tensor_BL: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor_BL is None else tensor_BL[:, 1:][mask_BT].to(device)

    task_advantage_N = None
    if batch.task_advantages_B is not None:
        task_advantage_N = batch.task_advantages_B[:, None].expand(mask_BT.shape)[mask_BT].to(device)
    return TokenBatch(
        target_ids_N=flat(batch.input_ids_BL),
        rollout_logprobs_N=flat(batch.rollout_logprobs_BL),
        token_weight_N=weights_BT[mask_BT.to(weights_BT.device)],
        teacher_logprobs_N=flat(batch.teacher_logprobs_BL),
        teacher_topk_ids_NK=flat(batch.teacher_topk_ids_BLK),
        teacher_topk_logprobs_NK=flat(batch.teacher_topk_logprobs_BLK),
        student_topk_ids_NK=flat(batch.student_topk_ids_BLK),
        teacher_logprobs_at_student_topk_NK=flat(batch.teacher_logprobs_at_student_topk_BLK),
        advantage_N=flat(batch.advantages_BL),
        task_advantage_N=task_advantage_N,
        bucket_N=position_buckets(mask_BT.float())[mask_BT].to(device),
        aligned_N=flat(batch.aligned_BL),
    )


def finish_token_batch(
    tokens: TokenBatch, per_token: dict[str, torch.Tensor], mask_BT: torch.Tensor, algorithm: AlgorithmSpec
) -> TokenBatch:
    """Adds what needed the current student: the vOPD baseline, IW-OPD weights, task reward, entropy gate."""
    updates = {}
    if algorithm.record.sequence_advantages and tokens.advantage_N is not None:
        advantage_N = tokens.advantage_N
        if "vopd_baseline" in per_token:
            advantage_N = advantage_N - per_token["vopd_baseline"].to(advantage_N.dtype)
        if algorithm.position_gamma:
            advantage_BT = torch.zeros(mask_BT.shape, dtype=advantage_N.dtype, device=advantage_N.device)
            advantage_BT[mask_BT.bool()] = advantage_N
            advantage_N = (advantage_BT * position_weights(advantage_BT, mask_BT, algorithm.position_gamma))[
                mask_BT.bool()
            ]
        if tokens.task_advantage_N is not None:
            advantage_N = advantage_N + algorithm.task_reward_coef * tokens.task_advantage_N
        updates["advantage_N"] = advantage_N
    if "student_entropy" in per_token:
        updates["keep_N"] = entropy_gate_keep(
            per_token["student_entropy"], per_token["teacher_entropy"], algorithm.entropy_gate
        ).to(tokens.target_ids_N.device)
    return replace(tokens, **updates)
