"""GGUF import of a Gemma 3 model (the other family of the real-model pair: docs/methods/real-models.md),
on a tiny Gemma 3 the test writes to GGUF itself in llama.cpp's layout: norm weights stored as
1 + w, a SentencePiece-style vocabulary with scores, and `add_bos_token` set, as Gemma 3 270M's file has."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_ray.recipe.real_models import import_model
from tests.unit.recipe.test_real_models import add_shape, written

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install 'opd-ray[gguf]'); CI installs it")

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids 0-3
PIECES = [*"abcdefghijklmnopqrstuvwxyz0123456789?:.\n", "▁", "▁a", "▁Q", "▁A"]
TOKENS = SPECIAL + PIECES
# transformers' Gemma 3 names -> llama.cpp's (blk.N.<name>.weight)
LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_gemma3():
    """Six layers: five sliding-window ones and a global one, Gemma 3's pattern (the GGUF does not store it)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        sliding_window=16,
        rms_norm_eps=1e-6,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norms away from their initial zeros, so that a missed "1 + w" shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0, 0.1)
    return model


def write_gemma3_gguf(model, path: Path) -> Path:
    config, state = model.config, {k: v.detach().float() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "gemma3")
    add_shape(writer, config)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0] * len(SPECIAL) + [-float(i) for i in range(len(PIECES))])
    writer.add_token_types([3] * len(SPECIAL) + [1] * len(PIECES))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())  # tied: no output.weight
    for i in range(config.num_hidden_layers):
        for ours, theirs in LAYER_TENSORS.items():
            weight = state[f"model.layers.{i}.{ours}.weight"]
            writer.add_tensor(f"blk.{i}.{theirs}.weight", (weight + 1 if "norm" in theirs else weight).numpy())
    writer.add_tensor("output_norm.weight", (state["model.norm.weight"] + 1).numpy())
    return written(writer, path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = tiny_gemma3()
    return model, write_gemma3_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny-gemma3.F32.gguf")


IDS = torch.tensor([[2, *range(4, 24)]])  # past the sliding window of 16: both attention kinds matter


def test_a_gemma3_gguf_becomes_a_folder_with_the_source_models_logits(source, tmp_path: Path) -> None:
    model, path = source
    folder = import_model(str(path), tmp_path / "imported")
    loaded = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    assert type(loaded).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_the_imported_tokenizer_starts_every_text_with_bos_as_the_gguf_says(source, tmp_path: Path) -> None:
    """transformers' GGUF reader drops `add_bos_token`; Gemma without its <bos> loses 2 nats/token."""
    tokenizer = AutoTokenizer.from_pretrained(import_model(str(source[1]), tmp_path / "imported"))
    assert tokenizer.convert_tokens_to_ids("▁Q") == TOKENS.index("▁Q")  # the GGUF's ids, in its order
    assert tokenizer("ab").input_ids[0] == 2 and tokenizer("ab", add_special_tokens=False).input_ids[0] != 2
    assert tokenizer.decode(tokenizer("ab1", add_special_tokens=False).input_ids) == "ab1"


def test_a_pruned_gemma3_keeps_the_layer_kinds_of_the_layers_it_keeps(source, tmp_path: Path) -> None:
    model, path = source
    folder = import_model(str(path), tmp_path / "pruned", layers=[0, 5])
    loaded = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    assert loaded.config.layer_types == [model.config.layer_types[0], model.config.layer_types[5]]
    assert loaded.config.layer_types[1] == "full_attention"
    state = loaded.state_dict()
    torch.testing.assert_close(state["model.layers.1.mlp.up_proj.weight"], model.model.layers[5].mlp.up_proj.weight)
