"""The teacher's two backends behind one interface: what scores a batch, answers greedily and takes new weights.

vLLM (fast) returns the teacher's log-prob of the sampled token and its own top-k.
transformers also returns log-probs at requested ids — the student's top-k at each position —
which top-k objectives on the student's or the union support need. Either way only k numbers
per token leave the replica: a full-vocabulary tensor never enters the object store.
A backend's record (spec/teacher_backends.py) names its class; a new backend is one class and one record.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from typing import Protocol

import torch

from opd_ray.actors.hf_model import check_packing_exact, load_causal_lm
from opd_ray.actors.vllm_engine import Completion, create_engine, greedy, prompt_logprobs
from opd_ray.actors.weight_sync import WORKER_EXTENSION, unpack_state_dict
from opd_ray.losses.batch import RolloutBatch
from opd_ray.losses.hidden import prompt_groups, response_hidden_states, shared_prompt_response_hidden
from opd_ray.spec import ModelSpec, NamedTeacherSpec


def attach_teacher_scores(batch: RolloutBatch, scored_B: list, top_k: int) -> RolloutBatch:
    """vLLM's flat prompt log-probs (see `vllm_engine.prompt_logprobs`) -> the batch's teacher tensors.

    Each scored sequence of n tokens holds (n - 1) x (k + 1) numbers: per position the actual
    token's log-prob, then the top-k ids by rank. They are reshaped, not looped over; values
    off the response are zeroed, as everywhere in a batch.
    """
    batch_size, length = batch.input_ids_BL.shape
    teacher_logprobs_BL = torch.zeros(batch_size, length)
    topk_ids_BLK = torch.zeros(batch_size, length, top_k, dtype=torch.long)
    topk_logprobs_BLK = torch.zeros(batch_size, length, top_k)
    for b, flat in enumerate(scored_B):
        n = int(batch.attention_mask_BL[b].sum())
        logprobs_PW = torch.tensor(flat.logprobs, dtype=torch.float32).view(n - 1, top_k + 1)
        ids_PW = torch.tensor(flat.token_ids, dtype=torch.long).view(n - 1, top_k + 1)
        teacher_logprobs_BL[b, 1:n] = logprobs_PW[:, 0]
        topk_logprobs_BLK[b, 1:n] = logprobs_PW[:, 1:]
        topk_ids_BLK[b, 1:n] = ids_PW[:, 1:]
    response_BL = batch.response_mask_BL
    return replace(
        batch,
        teacher_logprobs_BL=teacher_logprobs_BL * response_BL,
        teacher_topk_ids_BLK=topk_ids_BLK * response_BL.long().unsqueeze(-1),
        teacher_topk_logprobs_BLK=topk_logprobs_BLK * response_BL.unsqueeze(-1),
    )


class ContextTooShort(ValueError):
    """A sequence the teacher must score is longer than its engine's context (its own prompt, or a response that
    takes more of its tokens than the student's): one line for the driver, not an engine traceback."""


def check_context(longest: int, max_model_len: int, cross_tokenizer: bool) -> None:
    if longest > max_model_len:
        why = " (the student's response takes more tokens in the teacher's vocabulary)" if cross_tokenizer else ""
        raise ContextTooShort(
            f"the teacher must score a sequence of {longest} tokens, longer than its engine.max_model_len "
            f"({max_model_len}){why}: raise the teacher's engine.max_model_len or lower rollout.max_new_tokens"
        )


def score_with_transformers(
    model, batch: RolloutBatch, top_k: int, chunk_tokens: int, share_prompts: bool = True, pack: bool = False
) -> RolloutBatch:
    """Teacher log-probs of the sampled tokens, its top-k, and its log-probs at the student's top-k ids.

    The head runs on `chunk_tokens` response positions at a time, so memory holds one chunk's logits.
    With `share_prompts` and several samples of a prompt, the prompt runs once for all of them; otherwise, with
    `pack`, the rows run packed end to end (losses/hidden.py: packed_hidden_states).
    """
    device = next(model.parameters()).device
    response_BL = batch.response_mask_BL.bool()
    shared = share_prompts and len(prompt_groups(batch)) < batch.num_sequences
    with torch.no_grad():
        if shared:
            hidden_NH = shared_prompt_response_hidden(model, batch, device)
        else:
            hidden_NH = response_hidden_states(model, batch, device, pack)
        targets_N = batch.input_ids_BL[:, 1:][response_BL[:, 1:]].to(device)
        student_ids_NK = None
        if batch.student_topk_ids_BLK is not None:
            student_ids_NK = batch.student_topk_ids_BLK[:, 1:][response_BL[:, 1:]].to(device)
        head = model.get_output_embeddings()
        pieces: dict[str, list[torch.Tensor]] = {"token": [], "ids": [], "topk": [], "at_student": []}
        for start in range(0, hidden_NH.shape[0], chunk_tokens):
            part = slice(start, start + chunk_tokens)
            logprobs_NV = torch.log_softmax(head(hidden_NH[part]).float(), -1)
            pieces["token"].append(logprobs_NV.gather(-1, targets_N[part, None])[:, 0])
            top = logprobs_NV.topk(top_k, -1)
            pieces["ids"].append(top.indices)
            pieces["topk"].append(top.values)
            if student_ids_NK is not None:
                pieces["at_student"].append(logprobs_NV.gather(-1, student_ids_NK[part]))

    def to_positions(name: str, trailing: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
        out = torch.zeros(*batch.input_ids_BL.shape, *trailing, dtype=dtype)
        if pieces[name]:
            out[:, 1:][response_BL[:, 1:]] = torch.cat(pieces[name]).to("cpu", dtype)
        return out

    return replace(
        batch,
        teacher_logprobs_BL=to_positions("token", ()),
        teacher_topk_ids_BLK=to_positions("ids", (top_k,), torch.long),
        teacher_topk_logprobs_BLK=to_positions("topk", (top_k,)),
        teacher_logprobs_at_student_topk_BLK=(
            to_positions("at_student", (student_ids_NK.shape[-1],)) if student_ids_NK is not None else None
        ),
    )


def greedy_with_transformers(
    model, tokenizer, prompts_P: dict[int, list[int]], max_new_tokens: int
) -> list[Completion]:
    """Greedy decoding for evaluating a transformers-backed teacher (left-padded batches)."""
    device = next(model.parameters()).device
    completions = []
    indices = list(prompts_P)
    for start in range(0, len(indices), 64):
        chunk = indices[start : start + 64]
        longest = max(len(prompts_P[i]) for i in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (longest - len(prompts_P[i])) + prompts_P[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (longest - len(prompts_P[i])) + [1] * len(prompts_P[i]) for i in chunk])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        for i, row in zip(chunk, out[:, longest:].tolist(), strict=True):
            finished = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id) + 1] if finished else row
            text = tokenizer.decode(row, skip_special_tokens=True)
            completions.append(Completion(i, row, [], None, finished, text))
    return completions


class TeacherBackend(Protocol):
    """What a teacher replica needs of the model it holds."""

    def score(self, batch: RolloutBatch, cross_tokenizer: bool) -> RolloutBatch:
        """The batch with the teacher's tensors (log-prob of each sampled token, its top-k, and, when the batch
        carries the student's top-k ids and the backend can, its log-probs there)."""
        ...

    def greedy(self, prompts_P: dict[int, list[int]], max_new_tokens: int) -> list[Completion]: ...

    def load_weights(self, payload: dict) -> None:
        """The student's packed weights (a `self` teacher with `weights: current`)."""
        ...


class VllmTeacher:
    """A vLLM engine: prompt log-probs with the top-k of every position."""

    def __init__(self, model: ModelSpec, settings: NamedTeacherSpec, seed: int, tokenizer) -> None:
        self.settings = settings
        extension = WORKER_EXTENSION if settings.weights == "current" else None
        self.llm = create_engine(model, settings.engine, seed, extension)

    def score(self, batch: RolloutBatch, cross_tokenizer: bool) -> RolloutBatch:
        sequences = [
            batch.input_ids_BL[b, : int(batch.attention_mask_BL[b].sum())].tolist() for b in range(batch.num_sequences)
        ]
        check_context(max(map(len, sequences), default=0), self.settings.engine.max_model_len, cross_tokenizer)
        scores = prompt_logprobs(self.llm, sequences, self.settings.top_k)
        return attach_teacher_scores(batch, scores, self.settings.top_k)

    def greedy(self, prompts_P: dict[int, list[int]], max_new_tokens: int) -> list[Completion]:
        return greedy(self.llm, prompts_P, max_new_tokens)

    def load_weights(self, payload: dict) -> None:
        self.llm.collective_rpc("load_packed_weights", args=(payload,))
        self.llm.reset_prefix_cache()


class TransformersTeacher:
    """A transformers model: chunked log-softmax over response positions, and scores at requested ids."""

    def __init__(self, model: ModelSpec, settings: NamedTeacherSpec, seed: int, tokenizer) -> None:
        self.settings, self.tokenizer = settings, tokenizer
        self.model = load_causal_lm(model, "cuda" if torch.cuda.is_available() else "cpu")
        if settings.pack_sequences:
            vocab = self.model.get_output_embeddings().out_features
            check_packing_exact(self.model, vocab, self.model.device, "the teacher's pack_sequences")

    def score(self, batch: RolloutBatch, cross_tokenizer: bool) -> RolloutBatch:
        settings = self.settings
        return score_with_transformers(
            self.model, batch, settings.top_k, settings.chunk_tokens, settings.share_prompts, settings.pack_sequences
        )

    def greedy(self, prompts_P: dict[int, list[int]], max_new_tokens: int) -> list[Completion]:
        return greedy_with_transformers(self.model, self.tokenizer, prompts_P, max_new_tokens)

    def load_weights(self, payload: dict) -> None:
        missing, unexpected = self.model.load_state_dict(unpack_state_dict(payload), strict=False)
        untied = [name for name in missing if not self._tied(name)]
        if untied or unexpected:
            raise RuntimeError(f"weights do not fit the teacher's model: missing {untied}, unexpected {unexpected}")

    def _tied(self, name: str) -> bool:
        """The output head is left out of synced weights when it is tied to the embedding (weight_sync.py)."""
        head = self.model.get_output_embeddings()
        return (
            head is not None
            and head.weight is self.model.get_input_embeddings().weight
            and name.endswith("lm_head.weight")
        )


def backend_class(implementation: str) -> type[TeacherBackend]:
    """A backend's class from its record's `module:Class` (spec/teacher_backends.py): imported in the replica's
    own process, so a backend registered in the driver is found here too."""
    module, _, name = implementation.partition(":")
    return getattr(importlib.import_module(module), name)
