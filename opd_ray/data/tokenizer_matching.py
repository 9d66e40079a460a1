"""Two tokenizations of one text, lined up by bytes; and two vocabularies, matched by their tokens' text.

A teacher with another tokenizer cannot score the student's token ids. It scores the student's
*text* in its own tokens instead, and its numbers come back to the student's tokens through an
alignment: the smallest spans (chunks) at whose ends both tokenizations have a boundary at the same
byte. Bytes rather than characters, because byte-level tokenizers (GPT-2, Qwen, Llama-3) split
multi-byte characters across tokens; a character-level view would have no place for half an "é".

Each token's bytes come from a table built once per tokenizer (`token_bytes`): what the tokenizer's
decoder would write for that token alone. The end of sequence is a marker of its own past the text on
both sides, so the two end tokens always form a chunk of their own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

EOS_BYTE = b"\x00eos"  # stands for an end-of-sequence token: its length (one chunk of its own) is what matters
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def decoder_kinds(decoder: dict | None) -> set[str]:
    """The decoder types of a tokenizer.json `decoder` entry, nested Sequences included."""
    if not decoder:
        return set()
    kinds = {decoder.get("type", "")}
    for inner in decoder.get("decoders", []) or []:
        kinds |= decoder_kinds(inner)
    return kinds


def token_bytes(tokenizer) -> list[bytes]:
    """Each id's bytes as the tokenizer's decoder writes them; added and special tokens as their literal
    text, the end-of-sequence token as `EOS_BYTE`. Byte-level (GPT-2 style) tokens map each character
    back to its byte; SentencePiece-style tokens turn "▁" into a space and `<0xNN>` into the byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder")
    kinds = decoder_kinds(decoder)
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
    table = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i == tokenizer.eos_token_id:
            table.append(EOS_BYTE)
        elif i in added or token is None:
            table.append((added.get(i) or "").encode())
        elif "ByteLevel" in kinds:
            table.append(bytes(to_byte.get(char, 0) for char in token))
        elif "ByteFallback" in kinds and _BYTE_FALLBACK.fullmatch(token):
            table.append(bytes([int(token[3:5], 16)]))
        elif "Metaspace" in kinds or "Replace" in kinds:
            table.append(token.replace("\u2581", " ").encode())
        else:
            table.append(token.encode())
    return table


def response_text(token_ids: list[int], table: list[bytes]) -> str:
    """The text of response tokens, without the end of sequence; bytes that are not UTF-8 (a sample cut
    inside a character) become U+FFFD, which the alignment then absorbs into the last chunk."""
    return b"".join(table[i] for i in token_ids if table[i] != EOS_BYTE).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Chunk:
    """Student tokens [student_start, student_end) and teacher tokens [teacher_start, teacher_end): one text span."""

    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int

    @property
    def one_to_one(self) -> bool:
        """Both sides' next token covers the same text: the two distributions there can be compared."""
        return self.student_end - self.student_start == 1 and self.teacher_end - self.teacher_start == 1

    @property
    def one_student_token_spanning(self) -> bool:
        """One student token covering several teacher tokens ("12" against "1" "2"): the teacher's probability
        of that token is the product of its conditionals along the span."""
        return self.student_end - self.student_start == 1 and self.teacher_end - self.teacher_start > 1


def aligned_chunks(student_lengths: list[int], teacher_lengths: list[int]) -> list[Chunk]:
    """The smallest spans ending where both tokenizations have a boundary at the same byte offset.

    Each chunk takes at least one token from each side, then tokens from whichever side is behind until
    the offsets meet. A side that runs out (texts that differ at the end) leaves the rest in the last
    chunk; a zero-length token joins the chunk it starts, and a span left with no token on one side (a
    zero-length token at the end) joins the chunk before it.
    """
    chunks: list[Chunk] = []
    i = j = student_at = teacher_at = 0
    n, m = len(student_lengths), len(teacher_lengths)
    while i < n or j < m:
        start_i, start_j = i, j
        if i < n:
            student_at, i = student_at + student_lengths[i], i + 1
        if j < m:
            teacher_at, j = teacher_at + teacher_lengths[j], j + 1
        while student_at != teacher_at and (i < n or j < m):
            if (student_at < teacher_at and i < n) or j == m:
                student_at, i = student_at + student_lengths[i], i + 1
            else:
                teacher_at, j = teacher_at + teacher_lengths[j], j + 1
        chunk = Chunk(start_i, i, start_j, j)
        if chunks and (chunk.student_start == chunk.student_end or chunk.teacher_start == chunk.teacher_end):
            last = chunks.pop()
            chunk = Chunk(last.student_start, i, last.teacher_start, j)
        chunks.append(chunk)
    return chunks


def chunk_teacher_logprobs(
    student_logprobs_S: torch.Tensor, teacher_logprobs_T: torch.Tensor, chunks: list[Chunk]
) -> torch.Tensor:
    """The teacher value of each student token for the sampled-token objective.

    A chunk's reward is log q(chunk) - log p(chunk), both sums over the chunk's tokens, and every student
    token of the chunk gets it: log p(chunk) is the sum of those tokens' log-probs, so the score-function
    gradient of the chunk's reverse KL puts the chunk's reward on each of them. The value returned,
    log q(c) - log p(c) + log p(y_t), is the one for which the learner's per-token reward
    r_t = teacher - log p(y_t) equals that; with equal tokenizations every chunk is one token and it is
    log q(y_t) itself.
    """
    out_S = student_logprobs_S.clone()
    for chunk in chunks:
        student = slice(chunk.student_start, chunk.student_end)
        teacher_sum = teacher_logprobs_T[chunk.teacher_start : chunk.teacher_end].sum()
        others_S = student_logprobs_S[student].sum() - student_logprobs_S[student]  # exactly 0 for a one-token chunk
        out_S[student] = teacher_sum - others_S
    return out_S


def vocabulary_map(teacher_table: list[bytes], student_table: list[bytes]) -> torch.Tensor:
    """Teacher id -> the student id whose token has the same bytes, or -1 (exact vocabulary matching).
    The end-of-sequence tokens match each other; of several student ids with one text the lowest wins."""
    student_id: dict[bytes, int] = {}
    for i, text in enumerate(student_table):
        if text:
            student_id.setdefault(text, i)
    return torch.tensor([student_id.get(text, -1) if text else -1 for text in teacher_table], dtype=torch.long)
