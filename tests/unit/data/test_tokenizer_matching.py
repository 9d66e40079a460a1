"""Byte alignment of two tokenizations, chunk rewards and vocabulary matching, against hand-computed answers."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from opd_ray.data.arithmetic import ALPHABET
from opd_ray.data.tokenizer_matching import (
    EOS_BYTE,
    Chunk,
    aligned_chunks,
    chunk_teacher_logprobs,
    response_text,
    token_bytes,
    vocabulary_map,
)
from opd_ray.recipe.tiny_models import build_char_tokenizer, build_digit_pair_tokenizer


def spans(chunks):
    return [((c.student_start, c.student_end), (c.teacher_start, c.teacher_end)) for c in chunks]


def test_equal_tokenizations_align_token_by_token():
    chunks = aligned_chunks([1, 3, 2], [1, 3, 2])
    assert spans(chunks) == [((0, 1), (0, 1)), ((1, 2), (1, 2)), ((2, 3), (2, 3))]
    assert all(c.one_to_one for c in chunks)


def test_merged_and_split_tokens_form_the_smallest_common_spans():
    # student "12" "3" "45" ; teacher "1" "2" "3" "4" "5"
    assert spans(aligned_chunks([2, 1, 2], [1, 1, 1, 1, 1])) == [((0, 1), (0, 2)), ((1, 2), (2, 3)), ((2, 3), (3, 5))]
    # student "ab" "cd" ; teacher "a" "bc" "d": no common boundary inside, one chunk
    assert spans(aligned_chunks([2, 2], [1, 2, 1])) == [((0, 2), (0, 3))]


def test_a_zero_length_token_joins_a_chunk_and_a_longer_side_ends_in_the_last_chunk():
    assert spans(aligned_chunks([1, 0, 1], [1, 1])) == [((0, 1), (0, 1)), ((1, 3), (1, 2))]
    assert spans(aligned_chunks([1, 1, 0], [1, 1])) == [((0, 1), (0, 1)), ((1, 3), (1, 2))]
    # texts that differ at the end (a replaced byte): everything after the last common boundary is one chunk
    assert spans(aligned_chunks([1, 1, 1], [1, 3])) == [((0, 1), (0, 1)), ((1, 3), (1, 2))]
    assert aligned_chunks([], []) == []


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte, GPT-2 style (each byte shown as a printable character), plus an end token."""
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    vocab["<|end|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|end|>")


def test_a_multi_byte_character_split_by_a_byte_level_tokenizer_is_one_chunk(tmp_path):
    byte_level = byte_level_tokenizer()
    chars = build_char_tokenizer(ALPHABET + "é", tmp_path / "chars")
    byte_ids = byte_level("1é2", add_special_tokens=False).input_ids
    byte_table, char_table = token_bytes(byte_level), token_bytes(chars)
    assert [byte_table[i] for i in byte_ids] == [b"1", b"\xc3", b"\xa9", b"2"]
    assert response_text(byte_ids, byte_table) == "1é2"
    char_ids = chars("1é2").input_ids
    chunks = aligned_chunks([len(byte_table[i]) for i in byte_ids], [len(char_table[i]) for i in char_ids])
    assert spans(chunks) == [((0, 1), (0, 1)), ((1, 3), (1, 2)), ((3, 4), (2, 3))]


def test_end_of_sequence_tokens_form_a_chunk_of_their_own_and_other_specials_are_their_text(tmp_path):
    pairs = build_digit_pair_tokenizer(ALPHABET, tmp_path / "pairs")
    chars = build_char_tokenizer(ALPHABET, tmp_path / "chars")
    pair_table, char_table = token_bytes(pairs), token_bytes(chars)
    assert pair_table[pairs.eos_token_id] == char_table[chars.eos_token_id] == EOS_BYTE
    assert pair_table[pairs.pad_token_id] == b"<pad>"
    student = [*pairs("123").input_ids, pairs.eos_token_id]  # "12" "3" <eos>
    teacher = [*chars("123").input_ids, chars.eos_token_id]
    assert response_text(student, pair_table) == "123"
    chunks = aligned_chunks([len(pair_table[i]) for i in student], [len(char_table[i]) for i in teacher])
    assert spans(chunks) == [((0, 1), (0, 2)), ((1, 2), (2, 3)), ((2, 3), (3, 4))]
    assert [c.one_to_one for c in chunks] == [False, True, True]


def test_the_chunk_reward_is_the_per_token_reward_under_equal_tokenizations():
    student_S = torch.tensor([-0.5, -1.0, -2.0])
    teacher_T = torch.tensor([-0.1, -3.0, -0.7])
    identity = [Chunk(i, i + 1, i, i + 1) for i in range(3)]
    assert torch.equal(chunk_teacher_logprobs(student_S, teacher_T, identity), teacher_T)


def test_every_student_token_of_a_chunk_gets_the_chunks_reward():
    student_S = torch.tensor([-0.5, -1.0, -2.0])  # chunk 0: student tokens 0-1 ; chunk 1: token 2
    teacher_T = torch.tensor([-0.1, -0.2, -0.3, -0.7])  # chunk 0: teacher tokens 0-2 ; chunk 1: token 3
    chunks = [Chunk(0, 2, 0, 3), Chunk(2, 3, 3, 4)]
    reward_S = chunk_teacher_logprobs(student_S, teacher_T, chunks) - student_S
    chunk_reward = (-0.1 - 0.2 - 0.3) - (-0.5 - 1.0)
    assert torch.allclose(reward_S, torch.tensor([chunk_reward, chunk_reward, -0.7 + 2.0]))


def test_vocabulary_matching_pairs_tokens_with_the_same_text():
    teacher = [b"a", b"bc", EOS_BYTE, b"zz", b""]
    student = [b"bc", b"a", b"q", EOS_BYTE, b"a"]
    assert vocabulary_map(teacher, student).tolist() == [1, 0, 3, -1, -1]


def test_characters_under_other_ids_align_one_to_one_and_match_by_text(tmp_path):
    from opd_ray.recipe.tiny_models import build_reordered_char_tokenizer

    chars = build_char_tokenizer(ALPHABET, tmp_path / "chars")
    reordered = build_reordered_char_tokenizer(ALPHABET, tmp_path / "reordered")
    char_table, reordered_table = token_bytes(chars), token_bytes(reordered)
    student, teacher = reordered("407+19=").input_ids, chars("407+19=").input_ids
    assert student != teacher  # the same tokens under other ids
    chunks = aligned_chunks([len(reordered_table[i]) for i in student], [len(char_table[i]) for i in teacher])
    assert all(c.one_to_one for c in chunks) and len(chunks) == len(student)
    to_student = vocabulary_map(char_table, reordered_table)
    assert to_student[torch.tensor(teacher)].tolist() == student
