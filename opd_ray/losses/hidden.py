"""Final hidden states, so that the output head can run on a few thousand response tokens at a time.

Every learner loss and the transformers teacher backend take this path: no B x T x |V|
logits tensor is ever built, only one chunk of response tokens' logits at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def final_hidden_states(model: Callable[..., Any], input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor):
    """Last layer's (normalised) hidden states; asks the model for the logits of one position only
    and for no KV cache (a scoring or training forward never reads one)."""
    output = model(
        input_ids=input_ids_BL,
        attention_mask=attention_mask_BL,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    return output.hidden_states[-1]


def response_hidden(hidden_BLH: torch.Tensor, response_mask_BL: torch.Tensor) -> torch.Tensor:
    """Hidden states that predict the response tokens (position i-1 predicts token i), flattened to N."""
    return hidden_BLH[:, :-1][response_mask_BL[:, 1:].bool()]


def response_hidden_states(model: Callable[..., Any], batch, device: torch.device | str) -> torch.Tensor:
    """Final hidden states at the positions that predict a batch's response tokens, flattened to N."""
    hidden_BLH = final_hidden_states(model, batch.input_ids_BL.to(device), batch.attention_mask_BL.to(device))
    return response_hidden(hidden_BLH, batch.response_mask_BL.to(device))


def prompt_groups(batch) -> list[list[int]]:
    """Rows that share one prompt (samples of the same dataset row), in first-seen order."""
    groups: dict[int, list[int]] = {}
    for row, prompt in enumerate(batch.prompt_index_B.tolist()):
        groups.setdefault(prompt, []).append(row)
    return list(groups.values())


def shared_prompt_response_hidden(model: Callable[..., Any], batch, device: torch.device | str) -> torch.Tensor:
    """`response_hidden_states`, running each distinct prompt once: its samples continue from its KV cache.

    With n samples per prompt, a forward over whole sequences computes every prompt n times;
    here the prompt runs once, its cache is repeated n times and only the responses run on top
    of it. Same numbers (to float tolerance), same (sequence, position) order. For a teacher
    scoring long shared prompts (a system prompt, few-shot examples, a long question).
    """
    from transformers import DynamicCache

    per_row: dict[int, torch.Tensor] = {}
    for rows in prompt_groups(batch):
        response_BL = batch.response_mask_BL[rows].bool()
        start = int(response_BL[0].nonzero()[0])  # the prompt is everything before the first response token
        prompt_1P = batch.input_ids_BL[rows[0], :start].unsqueeze(0).to(device)
        cache = DynamicCache()
        prompt_out = model(input_ids=prompt_1P, past_key_values=cache, use_cache=True, output_hidden_states=True)
        cache.batch_repeat_interleave(len(rows))
        lengths = response_BL.sum(-1).tolist()
        width = max(lengths)
        responses_nR = batch.input_ids_BL[rows, start : start + width].to(device)
        mask_nR = response_BL[:, start : start + width].long().to(device)
        attention = torch.cat([torch.ones(len(rows), start, dtype=torch.long, device=device), mask_nR], -1)
        out = model(
            input_ids=responses_nR,
            attention_mask=attention,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        last_prompt_H = prompt_out.hidden_states[-1][0, -1]
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            # position start-1 predicts the first response token, response position j the (j+1)-th
            per_row[row] = torch.cat([last_prompt_H[None], out.hidden_states[-1][i, : length - 1]])
    return torch.cat([per_row[row] for row in range(batch.num_sequences)])
