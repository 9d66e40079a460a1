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
