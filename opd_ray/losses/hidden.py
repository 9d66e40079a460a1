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


def response_hidden_states(
    model: Callable[..., Any], batch, device: torch.device | str, pack: bool = False
) -> torch.Tensor:
    """Final hidden states at the positions that predict a batch's response tokens, flattened to N; with `pack`,
    computed on the batch's rows packed together (`packed_hidden_states`)."""
    ids_BL, mask_BL = batch.input_ids_BL.to(device), batch.attention_mask_BL.to(device)
    hidden_BLH = packed_hidden_states(model, ids_BL, mask_BL) if pack else final_hidden_states(model, ids_BL, mask_BL)
    return response_hidden(hidden_BLH, batch.response_mask_BL.to(device))


def pack_rows(lengths_B: list[int], capacity: int) -> list[list[int]]:
    """Rows into bins of at most `capacity` tokens: longest first, each into the first bin with room for it
    (first-fit decreasing, within 22% of the fewest bins). Rows keep whole: nothing is split across bins."""
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths_B)), key=lambda r: -lengths_B[r]):
        fits = next((b for b, free in enumerate(room) if lengths_B[row] <= free), None)
        if fits is None:
            bins.append([row])
            room.append(capacity - lengths_B[row])
        else:
            bins[fits].append(row)
            room[fits] -= lengths_B[row]
    return bins


PAIRED_WIDTH = 512  # batches at most half this wide are packed into rows twice their width


def packed_width(width: int) -> int:
    """The width of a packed row. Packing into the batch's own width saves nothing when every row is longer
    than half the longest (a chat prompt plus a short answer beside one cut off at the limit: the SmolLM2
    job's padding was 22-37% of its positions and no two rows fitted), so short batches pack into rows
    twice as wide. A packed row's attention costs its width squared, while the projections and MLP cost
    per token, so this stays below PAIRED_WIDTH, where attention is a small part of a layer's work."""
    return 2 * width if 2 * width <= PAIRED_WIDTH else width


def packed_hidden_states(model: Callable[..., Any], input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor):
    """`final_hidden_states` of right-padded rows, computed with the rows packed end to end into as few rows (of
    `packed_width`) as hold them, so the model does not run on padding.

    Each packed sequence's position ids restart at 0 and no attention mask is passed: under sdpa and eager,
    transformers builds a block-diagonal causal mask from the position ids, so no token sees another sequence.
    Flash-attention reads packed position ids only in a batch of ONE row (transformers'
    `_is_packed_sequence`); with two or more bins it would attend across sequences, so it is handed the
    sequences' boundaries explicitly (`varlen_boundaries`). A bin's unused tail is one more sequence of its
    own. Same numbers as the padded forward to float tolerance (tests/unit/losses/test_packing.py, and
    `check_packing_exact` at start-up with the implementation in use), back in the padded [B, L, H] layout."""
    lengths = attention_mask_BL.sum(-1).tolist()
    padded = input_ids_BL.shape[1]
    width = packed_width(padded)
    bins = pack_rows(lengths, width)
    right_padded = bool(
        (torch.arange(padded, device=attention_mask_BL.device) < attention_mask_BL.sum(-1, keepdim=True))
        .eq(attention_mask_BL.bool())
        .all()
    )
    if len(bins) == len(lengths) or not right_padded:  # nothing to gain, or a layout this does not read
        return final_hidden_states(model, input_ids_BL, attention_mask_BL)
    ids_PC = input_ids_BL.new_zeros(len(bins), width)
    positions_PC = torch.zeros_like(ids_PC)
    source = torch.zeros(len(lengths) * padded, dtype=torch.long)  # padded flat position -> packed flat position
    for b, rows in enumerate(bins):
        offset = 0
        for row in rows:
            n = lengths[row]
            ids_PC[b, offset : offset + n] = input_ids_BL[row, :n]
            positions_PC[b, offset : offset + n] = torch.arange(n)
            source[row * padded : row * padded + n] = torch.arange(b * width + offset, b * width + offset + n)
            offset += n
        positions_PC[b, offset:] = torch.arange(width - offset)
    output = model(
        input_ids=ids_PC,
        attention_mask=None,
        position_ids=positions_PC,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
        **(varlen_boundaries(positions_PC) if uses_flash_attention(model) else {}),
    )
    hidden_PCH = output.hidden_states[-1]
    real_BL = attention_mask_BL.bool()
    hidden_BLH = hidden_PCH.new_zeros(*input_ids_BL.shape, hidden_PCH.shape[-1])
    taken = source.view(real_BL.shape)[real_BL.cpu()].to(hidden_PCH.device)
    hidden_BLH[real_BL] = hidden_PCH.reshape(-1, hidden_PCH.shape[-1])[taken]
    return hidden_BLH


def uses_flash_attention(model: Any) -> bool:
    """Whether the model (or the one a DeepSpeed engine or LoRA wrapper holds) runs a flash-attention kernel."""
    from transformers.utils.generic import is_flash_attention_requested

    config = getattr(getattr(model, "module", model), "config", None)
    return config is not None and is_flash_attention_requested(config)


def varlen_boundaries(positions_PC: torch.Tensor) -> dict[str, Any]:
    """Flash-attention's variable-length arguments for packed rows: where each sequence starts in the rows
    flattened end to end (a position id of 0), and the longest. Given these, transformers calls the kernel's
    varlen function on the flattened rows whatever the batch size (`_flash_attention_forward`'s varlen case)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (starts_q, starts_k), (longest_q, longest_k) = prepare_fa_kwargs_from_position_ids(positions_PC)
    return {
        "cu_seq_lens_q": starts_q,
        "cu_seq_lens_k": starts_k,
        "max_length_q": int(longest_q),
        "max_length_k": int(longest_k),
    }


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
