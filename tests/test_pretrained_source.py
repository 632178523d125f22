"""A pretrained model as the source, as it is (``data@source.data=none``), and normalisation that
follows the model (issue 15, items 2 and 3).

Local helpers (``pngs``, ``timm_file``, ``cfg_of``): an image folder and a timm weights file made
in the test, and the overrides of a pretrained-source run on them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.conftest import compose_cfg
from transfer_lab.errors import ConfigError
from transfer_lab.io import sha256_file
from transfer_lab.run import prepare, run

IMAGENET_MEAN = [0.485, 0.456, 0.406]


def pngs(root: Path, classes=("cat", "dog"), n_train: int = 6, n_test: int = 3, size: int = 16) -> Path:
    """A tiny PNG image folder: ``root/{train,test}/<class>/*.png``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 2 + 100 * c
                Image.fromarray(x.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def timm_file(path: Path, k: int = 3, seed: int = 0) -> Path:
    """A timm resnet18 with a ``k``-class classifier, saved as timm saves it (``fc.*`` head)."""
    import timm

    torch.manual_seed(seed)
    save_file(timm.create_model("resnet18", num_classes=k).state_dict(), str(path))
    return path


def cfg_of(tmp_path: Path, weights: Path, *extra: str, source_data: str = "data@source.data=none"):
    folder = tmp_path / "imgs"
    if not folder.exists():
        pngs(folder)
    return compose_cfg(source_data, "model@source.model=timm", "source.model.name=resnet18",
                       f"source.model.weights={weights}", "data@target.data=image_folder",
                       f"target.data.root={folder}", "target.data.image_size=16",
                       f"target.data.cache_dir={tmp_path / 'cache'}", "target.data.val_fraction=0.34",
                       "target.epochs=1", "logger=none", *extra, store=tmp_path / "store")


@pytest.fixture
def fits(monkeypatch):
    """Every ``Trainer.fit`` of the run: the source stage's would be the first."""
    calls: list[str] = []
    real = L.Trainer.fit

    def spy(self, module, *a, **k):
        calls.append(type(module.strategy).__name__)
        return real(self, module, *a, **k)

    monkeypatch.setattr(L.Trainer, "fit", spy)
    return calls


@pytest.mark.slow
def test_pretrained_source_linear_probe_trains_only_the_head(tmp_path, fits):
    w = timm_file(tmp_path / "r18.safetensors", k=3)
    res = run(cfg_of(tmp_path, w, "strategy=linear_probe"), tmp_path / "out")
    assert fits == ["LinearProbe"]  # the target stage only: no source training
    assert not (tmp_path / "store" / ".logs").exists()
    assert res["params"]["trainable"] == 512 * 2 + 2  # the new 2-class head of resnet18's 512 features
    src = res["source"]
    assert src["sha256"] == sha256_file(w) and src["weights_file"] == str(w)
    assert src["num_classes"] == 3  # the file's classifier, not the target's 2 classes
    assert set(res["transferability"]) >= {"logme", "leep"}  # LEEP reads the file's 3-class head
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["source"]["sha256"] == sha256_file(w)
    assert on_disk["data"]["target"]["normalization"] == "model"
    assert on_disk["data"]["target"]["mean"] == pytest.approx(IMAGENET_MEAN, abs=1e-6)


def test_pretrained_backbone_is_the_file_and_scratch_does_not_load_it(tmp_path, monkeypatch):
    import transfer_lab.models.timm_models as tm

    w = timm_file(tmp_path / "r18.safetensors", k=3)
    file_conv = load_file(str(w))["conv1.weight"]
    reads: list[str] = []
    real = tm.load_timm_weights
    monkeypatch.setattr(tm, "load_timm_weights", lambda *a, **k: reads.append(str(a[1])) or real(*a, **k))
    p = prepare(cfg_of(tmp_path, w, "strategy=scratch"))
    assert reads == [] and p.source_model is None  # scratch: the inherited config's weights are not read
    assert not torch.equal(p.target_model.backbone.conv1.weight, file_conv)
    p = prepare(cfg_of(tmp_path, w, "strategy=finetune"))
    assert set(reads) == {str(w)}  # the source's build reads it; the target model still starts random
    assert torch.equal(p.source_model.backbone.conv1.weight, file_conv)
    assert not torch.equal(p.target_model.backbone.conv1.weight, file_conv)


def test_no_weights_and_no_data_is_one_line_before_training(tmp_path, fits):
    cfg = cfg_of(tmp_path, tmp_path / "x.safetensors", "strategy=finetune", "source.model.weights=null")
    with pytest.raises(ConfigError, match=r"source.data=none.*source.model.weights"):
        run(cfg, tmp_path / "out")
    assert fits == []


@pytest.mark.slow
def test_store_key_follows_content_not_path(tmp_path):
    w = timm_file(tmp_path / "a.safetensors", seed=0)
    first = run(cfg_of(tmp_path, w, "strategy=linear_probe", "target.epochs=0", "transferability=false"),
                tmp_path / "r1")["source"]
    moved = tmp_path / "elsewhere" / "b.safetensors"
    moved.parent.mkdir()
    shutil.move(w, moved)
    second = run(cfg_of(tmp_path, moved, "strategy=linear_probe", "target.epochs=0", "transferability=false"),
                 tmp_path / "r2")["source"]
    assert second["key"] == first["key"] and second["cache_hit"] is True
    changed = timm_file(tmp_path / "a.safetensors", seed=1)  # same path as the first, new content
    third = run(cfg_of(tmp_path, changed, "strategy=linear_probe", "target.epochs=0", "transferability=false"),
                tmp_path / "r3")["source"]
    assert third["key"] != first["key"] and third["sha256"] != first["sha256"]


def test_normalisation_follows_the_model_unless_the_data_sets_it(tmp_path):
    from transfer_lab.builders import model_data_overrides

    w = timm_file(tmp_path / "r18.safetensors")
    cfg = cfg_of(tmp_path, w, "strategy=linear_probe", "target.data.image_size=null")
    got = model_data_overrides(cfg.target.data, cfg.source.model)
    assert got["mean"] == pytest.approx(IMAGENET_MEAN) and got["image_size"] == 224 and got["channels"] == 3
    cfg = cfg_of(tmp_path, w, "strategy=linear_probe", "+target.data.mean=[0.5,0.5,0.5]",
                 "+target.data.std=[0.2,0.2,0.2]")
    assert model_data_overrides(cfg.target.data, cfg.source.model) == {"channels": 3}  # size, stats: the data's
    own = compose_cfg()  # tiny_cnn: no statistics of its own
    assert model_data_overrides(own.target.data, own.source.model) == {}


@pytest.mark.slow
def test_stored_source_is_rebuilt_without_its_init_file(tmp_path):
    """A source trained from a weights file is stored; a later run loads the entry without the file."""
    w = timm_file(tmp_path / "init.safetensors")
    folder = pngs(tmp_path / "src_imgs", classes=("a", "b", "c"))
    args = (f"source.data.root={folder}", "source.data.image_size=16",
            f"source.data.cache_dir={tmp_path / 'cache'}", "source.data.val_fraction=0.34",
            "source.epochs=1", "strategy=linear_probe", "target.epochs=0", "transferability=false")
    on_folder = "data@source.data=image_folder"
    first = run(cfg_of(tmp_path, w, *args, source_data=on_folder), tmp_path / "r1")["source"]
    w.unlink()  # the stored entry holds every weight: the init file is not needed any more
    second = run(cfg_of(tmp_path, w, *args, source_data=on_folder), tmp_path / "r2")["source"]
    assert second["key"] == first["key"] and second["cache_hit"] is True
    assert first["data"]["normalization"] == "model"
