"""Prompt files and templates: jsonl and parquet, bad files named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_ray.data.arithmetic import make_split, write_task_files
from opd_ray.data.prompts import load_prompts
from opd_ray.errors import UserError
from opd_ray.spec import DatasetSpec, DataSpec


@pytest.fixture
def tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "student")


def test_task_splits_are_disjoint(tmp_path: Path) -> None:
    train, held_out = write_task_files(tmp_path, seed=0, train_size=300, eval_size=50)
    train_prompts = {json.loads(line)["prompt"] for line in train.read_text().splitlines()}
    eval_prompts = {json.loads(line)["prompt"] for line in held_out.read_text().splitlines()}
    assert len(train_prompts) == 300 and len(eval_prompts) == 50
    assert not train_prompts & eval_prompts
    row = make_split(1, 1)[0]
    a, b = row["prompt"].rstrip("=").split("+")
    assert row["answer"] == str(int(a) + int(b))[::-1]


def test_jsonl_and_parquet_read_the_same(tmp_path: Path, tokenizer) -> None:
    import datasets

    rows = [{"question": "12+34=", "solution": "64"}, {"question": "5+5=", "solution": "01"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    data = DataSpec(train=DatasetSpec(path=str(jsonl)), prompt_template="{prompt}")
    for path in (jsonl, parquet):
        spec = DatasetSpec(path=str(path), prompt_field="question", answer_field="solution")
        prompts = load_prompts(spec, data, tokenizer, "data.train")
        assert prompts.answers == ["64", "01"]
        assert tokenizer.decode(prompts.prompt_ids[0]) == "12+34="


def test_prompt_template_is_applied(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "1+2", "answer": "3"}))
    data = DataSpec(train=DatasetSpec(path=str(path)), prompt_template="{prompt}=")
    prompts = load_prompts(data.train, data, tokenizer, "data.train")
    assert tokenizer.decode(prompts.prompt_ids[0]) == "1+2="


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "has no rows"),
        ('{"text": "1+1="}\n', "field 'prompt' not in"),
        ('{"prompt": ""}\n', "row 1: 'prompt' is empty"),
        ("not json at all\n", "cannot read"),
    ],
)
def test_bad_prompt_files_are_named(tmp_path: Path, tokenizer, content: str, fragment: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    data = DataSpec(train=DatasetSpec(path=str(path), answer_field=None))
    with pytest.raises(UserError, match=fragment):
        load_prompts(data.train, data, tokenizer, "data.train")


def llama_style_tokenizer(chat_template: str):
    """A word-level tokenizer that, like Llama's, puts <s> before every text it encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "what": 5, "is": 6, "1+2?": 7}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.mark.parametrize(
    "chat_template",
    [
        "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",  # writes its own BOS
        "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",  # leaves it to the tokenizer
    ],
)
@pytest.mark.parametrize("use_chat_template", [True, False])
def test_a_llama_style_prompt_starts_with_exactly_one_bos(chat_template: str, use_chat_template: bool) -> None:
    from opd_ray.data.prompts import render_prompt

    tokenizer = llama_style_tokenizer(chat_template)
    data = DataSpec(train=DatasetSpec(path="unused.jsonl"), use_chat_template=use_chat_template)
    ids = render_prompt("what is 1+2?", data, tokenizer)
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids[-3:] == ([6, 7, 4] if use_chat_template else [5, 6, 7])


def test_a_tokenizer_without_bos_gets_none(tokenizer) -> None:
    from opd_ray.data.prompts import render_prompt

    data = DataSpec(train=DatasetSpec(path="unused.jsonl"))
    assert render_prompt("12+3=", data, tokenizer) == tokenizer("12+3=", add_special_tokens=False).input_ids


def test_the_system_prompt_is_the_chat_templates_system_turn() -> None:
    from opd_ray.data.prompts import render_prompt

    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    tokenizer = llama_style_tokenizer(template)
    data = DataSpec(train=DatasetSpec(path="unused.jsonl"), use_chat_template=True, system_prompt="what")
    rendered = tokenizer.decode(render_prompt("1+2?", data, tokenizer), skip_special_tokens=True)
    plain = DataSpec(train=DatasetSpec(path="unused.jsonl"), use_chat_template=True)
    assert "what" in rendered and "what" not in tokenizer.decode(render_prompt("1+2?", plain, tokenizer))


def test_a_system_prompt_without_the_chat_template_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"data\.system_prompt is a turn of the chat template"):
        DataSpec(train=DatasetSpec(path="unused.jsonl"), system_prompt="Answer briefly.")
