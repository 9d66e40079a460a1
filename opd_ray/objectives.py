"""Distillation objectives: pure tensor functions, testable without Ray or DeepSpeed.

All per-token inputs are target-aligned: [b, t] is the t-th predicted token of sequence b,
T = L - 1 positions, `mask_BT` is 1 on response tokens. Each objective returns its
per-token losses (zero off the response); `aggregate` turns them into the token-mean or
sequence-mean over the *global* batch, so the mean is exact across data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd_ray.spec import AlgorithmSpec


@dataclass
class ObjectiveInputs:
    student_logits_BTV: torch.Tensor  # with grad
    target_ids_BT: torch.Tensor
    mask_BT: torch.Tensor
    rollout_logprobs_BT: torch.Tensor  # log p_old(y_t), detached
    teacher_logprobs_BT: torch.Tensor | None = None  # log q(y_t); None for supervised batches
    teacher_topk_ids_BTK: torch.Tensor | None = None
    teacher_topk_logprobs_BTK: torch.Tensor | None = None
    advantage_BT: torch.Tensor | None = None  # precomputed over the whole batch (returns, standardisation)


def token_logprobs(logits_BTV: torch.Tensor, target_ids_BT: torch.Tensor) -> torch.Tensor:
    """log softmax at the chosen token, without materialising a second B x T x V tensor."""
    chosen_BT = logits_BTV.gather(-1, target_ids_BT.unsqueeze(-1)).squeeze(-1)
    return chosen_BT - torch.logsumexp(logits_BTV, dim=-1)


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


def vopd_baseline(inputs: ObjectiveInputs) -> torch.Tensor:
    """V(s_t) = -KL(p_t || q_t) in closed form on the teacher's top-k, detached (vOPD).

    The one-sample reward r_t has expectation -KL(p_t || q_t) under the student, so
    subtracting it leaves the gradient unbiased and removes most of its variance.
    """
    with torch.no_grad():
        return -topk_reverse_kl(inputs)


def position_weights(advantage_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """IW-OPD: w_t = 1 + gamma (1 - sum_{k<t}|A_k| / sum_k |A_k|), per sequence.

    Early tokens, before most of a response's disagreement with the teacher has happened,
    weigh up to 1 + gamma; the last weigh about 1.
    """
    magnitude_BT = advantage_BT.abs() * mask_BT
    before_BT = magnitude_BT.cumsum(-1) - magnitude_BT
    total_B1 = magnitude_BT.sum(-1, keepdim=True).clamp(min=1e-12)
    return (1 + gamma * (1 - before_BT / total_B1)) * mask_BT


def sampled_token_reverse_kl(
    inputs: ObjectiveInputs, clip_eps: float | None, baseline: str = "none", position_gamma: float = 0.0
) -> torch.Tensor:
    """One-sample reverse KL as a dense reward inside an importance-sampled surrogate.

    Advantage defaults to r_t = log q(y_t) - log p_old(y_t) per token (see
    `reverse_kl_advantages` for returns and standardisation). Ratio p_theta / p_old, with
    PPO clipping when `clip_eps` is set so a stale or mismatched p_old cannot blow up;
    `clip_eps=None` is the plain importance-sampling loss (tinker's recipe).
    """
    student_logprobs_BT = token_logprobs(inputs.student_logits_BTV, inputs.target_ids_BT)
    advantage_BT = inputs.advantage_BT
    if advantage_BT is None:
        advantage_BT = reverse_kl_advantages(inputs.teacher_logprobs_BT, inputs.rollout_logprobs_BT, inputs.mask_BT)
    if baseline == "vopd":
        advantage_BT = (advantage_BT - vopd_baseline(inputs)) * inputs.mask_BT
    if position_gamma:
        advantage_BT = advantage_BT * position_weights(advantage_BT, inputs.mask_BT, position_gamma)
    ratio_BT = torch.exp(student_logprobs_BT - inputs.rollout_logprobs_BT)
    surrogate_BT = ratio_BT * advantage_BT
    if clip_eps is not None:
        clipped_BT = ratio_BT.clamp(1 - clip_eps, 1 + clip_eps)
        surrogate_BT = torch.minimum(surrogate_BT, clipped_BT * advantage_BT)
    return -surrogate_BT * inputs.mask_BT


def topk_reverse_kl(inputs: ObjectiveInputs) -> torch.Tensor:
    """Analytic KL(p_bar || q_bar) on the teacher's top-k support S_t.

    Both distributions are renormalised on S_t; when k covers the vocabulary this is the
    exact reverse KL. Far less noisy than the one-sample estimate, and needs only the
    student's logits at k ids, never a full-vocabulary teacher tensor.
    """
    student_on_support_BTK = inputs.student_logits_BTV.gather(-1, inputs.teacher_topk_ids_BTK)
    log_p_BTK = torch.log_softmax(student_on_support_BTK, dim=-1)
    log_q_BTK = torch.log_softmax(inputs.teacher_topk_logprobs_BTK, dim=-1)
    kl_BT = (log_p_BTK.exp() * (log_p_BTK - log_q_BTK)).sum(-1)
    return kl_BT * inputs.mask_BT


def sft_cross_entropy(logits_BTV: torch.Tensor, target_ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each response token (prompt tokens carry no loss)."""
    return -token_logprobs(logits_BTV, target_ids_BT) * mask_BT


def aggregate(
    loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, global_tokens: int, global_sequences: int
) -> torch.Tensor:
    """This rank's share of the global token-mean or sequence-mean (the shares add up to the mean)."""
    if mode == "token_mean":
        return loss_BT.sum() / max(1, global_tokens)
    tokens_B = mask_BT.sum(-1).clamp(min=1)
    return (loss_BT.sum(-1) / tokens_B).sum() / max(1, global_sequences)


Objective = Callable[[ObjectiveInputs, AlgorithmSpec], torch.Tensor]

# name in `algorithm.objective` -> per-token loss; a new objective is one function and one entry.
OBJECTIVES: dict[str, Objective] = {
    "topk_reverse_kl": lambda inputs, algorithm: topk_reverse_kl(inputs),
    "sampled_token": lambda inputs, algorithm: sampled_token_reverse_kl(
        inputs, algorithm.clip_eps, algorithm.baseline, algorithm.position_gamma
    ),
    "sft": lambda inputs, algorithm: sft_cross_entropy(inputs.student_logits_BTV, inputs.target_ids_BT, inputs.mask_BT),
}
