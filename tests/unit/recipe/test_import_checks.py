"""import-model and models.import_pretrained refuse, before loading any weights: a folder that is not a model
folder, layers the source does not have (read from config.json or the GGUF header), and a build directory inside
its own source."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_ray.errors import UserError
from opd_ray.recipe import real_models


@pytest.fixture
def no_weights_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(real_models, "load_pretrained", loading)


def test_a_source_folder_without_config_json_is_not_a_model_folder(tmp_path: Path, no_weights_loaded) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(UserError, match=r"source: .*weights is a folder without config.json"):
        real_models.import_model(str(tmp_path / "weights"), tmp_path / "out")


def test_layers_past_the_sources_depth_are_refused_from_its_header(tmp_path: Path, no_weights_loaded) -> None:
    import gguf
    import numpy as np

    source = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_block_count(30)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=r"--keep-layers: \[30, 31\] outside the source's 30 layers \(0..29\)"):
        real_models.import_model(str(source), tmp_path / "out", layers=[0, 30, 31])

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')
    with pytest.raises(UserError, match=r"--keep-layers: \[4\] outside the source's 4 layers"):
        real_models.import_model(str(folder), tmp_path / "out", layers=[0, 4])


def test_a_build_directory_inside_its_own_source_is_refused(tmp_path: Path, no_weights_loaded) -> None:
    from opd_ray.spec import load_spec
    from tests.conftest import REPO

    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')
    overrides = [f"models.import_pretrained.source={source}", f"models.import_pretrained.directory={source / 'built'}"]
    spec = load_spec(REPO / "examples" / "smollm2_distill.yaml", overrides)
    with pytest.raises(UserError, match=r"directory: .*built lies inside models.import_pretrained.source"):
        real_models.ensure_imported_models(spec)
