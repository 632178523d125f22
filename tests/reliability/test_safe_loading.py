"""Safe loading: nothing unpickled runs code, every package is validated before use."""

from __future__ import annotations

import ast
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from conftest import ROOT, compose_cfg
from reliability.helpers import write_pickle_bomb
from transfer_lab.checkpoint import load_trainable, save_trainable
from transfer_lab.errors import ConfigError
from transfer_lab.io import sha256_bytes
from transfer_lab.models import mlp
from transfer_lab.run import run
from transfer_lab.store import SourceStore
from transfer_lab.package import export_package, import_package, load_state_dict, read_package, store_key


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip(), f"not one line: {msg!r}"
    return msg


# --- pickles --------------------------------------------------------------------------------
def test_pickle_bomb_is_live_when_trusted(tmp_path):
    """The crafted file really does run code if loaded the unsafe way (so the tests below mean something)."""
    marker = tmp_path / "pwned"
    bomb = write_pickle_bomb(tmp_path / "bomb.pt", marker)
    torch.load(bomb, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name, wrap", [("bomb.pt", True), ("bomb.ckpt", True), ("bomb.pth", False)])
def test_pickle_that_runs_code_is_refused_with_one_line(tmp_path, name, wrap):
    marker = tmp_path / "pwned"
    bomb = write_pickle_bomb(tmp_path / name, marker, wrap_state=wrap)
    with pytest.raises(ConfigError) as e:
        load_state_dict(bomb)
    msg = one_line(e)
    assert str(bomb) in msg and "refused" in msg and "open" in msg  # names the forbidden global
    assert not marker.exists()


def test_pickle_bomb_as_source_checkpoint_stops_the_run_before_training(tmp_path):
    marker = tmp_path / "pwned"
    bomb = write_pickle_bomb(tmp_path / "bomb.ckpt", marker)
    cfg = compose_cfg("strategy=finetune", f"source.checkpoint={bomb}", store=tmp_path / "store")
    with pytest.raises(ConfigError, match="source.checkpoint=.*refused"):
        run(cfg, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "store").exists()


def test_weights_only_checkpoint_still_loads(tmp_path):
    state = {"model.backbone.w": torch.arange(6.0).view(2, 3)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ok.ckpt")
    assert torch.equal(load_state_dict(tmp_path / "ok.ckpt")["backbone.w"], state["model.backbone.w"])


def _unsafe_loads(path: Path) -> list[str]:
    """``torch.load`` without ``weights_only=True``, ``np.load`` with pickles, raw ``pickle.load``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        fn = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if ((fn == "torch.load" and kw.get("weights_only") != "True")
                or (fn in ("np.load", "numpy.load") and kw.get("allow_pickle") not in (None, "False"))
                or fn in ("pickle.load", "pickle.loads")):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def _sources_that_load() -> list:
    params = []
    for path in sorted((ROOT / "transfer_lab").rglob("*.py")):
        if "load(" not in path.read_text():
            continue
        params.append(pytest.param(path, id=str(path.relative_to(ROOT))))
    return params


@pytest.mark.parametrize("path", _sources_that_load())
def test_every_load_in_the_package_is_weights_only(path):
    """Static guard: no code path in transfer_lab unpickles with weights_only unset or False."""
    assert not _unsafe_loads(path)


@pytest.mark.parametrize("blob", [b"", b"not safetensors at all", b"\xff" * 64])
def test_garbage_safetensors_is_one_line(tmp_path, blob):
    (tmp_path / "w.safetensors").write_bytes(blob)
    with pytest.raises(ConfigError) as e:
        load_state_dict(tmp_path / "w.safetensors")
    assert "w.safetensors" in one_line(e)


# --- knowledge packages ------------------------------------------------------------------------
MODEL = {"_target_": "transfer_lab.models.mlp", "hidden": [16], "dropout": 0.0, "batch_norm": True}


def make_spec(model: dict | None = None) -> dict:
    spec = {"model": model or dict(MODEL), "input_shape": [1, 8, 8], "num_classes": 3, "seed": 0}
    return {**spec, "key": store_key(spec)}


def write_package(path: Path, state: dict, config: dict, metrics: dict | None = None,
                  skip: tuple[str, ...] = (), manifest: dict | None = None) -> Path:
    blobs = {"model.safetensors": st_save(state), "config.json": json.dumps(config).encode(),
             "metrics.json": json.dumps(metrics or {"test/acc": 0.5}).encode()}
    man = manifest or {"key": config.get("key"), "sha256": {f: sha256_bytes(b) for f, b in blobs.items()}}
    blobs["manifest.json"] = json.dumps(man).encode()
    with zipfile.ZipFile(path, "w") as z:
        for f, b in blobs.items():
            if f not in skip:
                z.writestr(f, b)
    return path


@pytest.fixture
def good(tmp_path):
    config = make_spec()
    model = mlp(1, 8, 3, hidden=[16], batch_norm=True)
    state = model.state_dict()
    store = SourceStore(tmp_path / "store")
    store.save(config["key"], state, config, {"test/acc": 0.5})
    return store, config, state


def test_valid_package_round_trips_identically(good, tmp_path):
    store, config, state = good
    pkg = export_package(store, config["key"], tmp_path / "pkg.zip")
    other = SourceStore(tmp_path / "other")
    assert import_package(pkg, other) == config["key"]
    loaded, _, _ = other.load(config["key"])
    assert all(torch.equal(loaded[k], v) for k, v in state.items()) and loaded.keys() == state.keys()


def _tampered(state: dict, kind: str) -> dict:
    s = {k: v.clone() for k, v in state.items()}
    if kind == "shape":
        s["backbone.fc1.0.weight"] = torch.zeros(17, 64)
    elif kind == "dtype":
        s["backbone.fc1.0.weight"] = s["backbone.fc1.0.weight"].double()
    elif kind == "missing":
        del s["head.bias"]
    elif kind == "extra":
        s["backbone.evil"] = torch.zeros(1)
    elif kind == "nan":
        s["head.bias"] = torch.full_like(s["head.bias"], float("nan"))
    return s


@pytest.mark.parametrize("kind, match", [
    ("shape", r"backbone.fc1.0.weight has shape \(17, 64\), the model expects \(16, 64\)"),
    ("dtype", r"backbone.fc1.0.weight has dtype torch.float64, the model expects torch.float32"),
    ("missing", r"missing \['head.bias'\]"),
    ("extra", r"unexpected \['backbone.evil'\]"),
    ("nan", r"head.bias holds non-finite values"),
])
def test_package_tensors_are_checked_against_the_model_its_config_rebuilds(good, tmp_path, kind, match):
    _, config, state = good
    pkg = write_package(tmp_path / "p.zip", _tampered(state, kind), config)
    target = SourceStore(tmp_path / "target")
    with pytest.raises(ConfigError, match=match) as e:
        import_package(pkg, target)
    assert str(pkg) in one_line(e)
    assert not target.root.exists() or not any(target.root.glob("*/manifest.json"))


def test_package_checksum_mismatch_and_missing_files(good, tmp_path):
    _, config, state = good
    sums = {"config.json": sha256_bytes(json.dumps(config).encode()),
            "metrics.json": sha256_bytes(json.dumps({"test/acc": 0.5}).encode())}
    for bad in ("model.safetensors", "config.json", "metrics.json"):
        man = {"key": config["key"], "sha256": {**sums, "model.safetensors": sha256_bytes(st_save(state)),
                                                bad: "0" * 64}}
        with pytest.raises(ConfigError, match=f"checksum mismatch for {bad}") as e:
            read_package(write_package(tmp_path / "a.zip", state, config, manifest=man))
        one_line(e)
    with pytest.raises(ConfigError, match="missing manifest.json"):
        read_package(write_package(tmp_path / "b.zip", state, config, skip=("manifest.json",)))
    (tmp_path / "c.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match="not a readable zip") as e:
        read_package(tmp_path / "c.zip")
    one_line(e)


@pytest.mark.parametrize("model", [
    {"_target_": "builtins.open", "file": "MARKER", "mode": "w"},
    {**MODEL, "hidden": {"_target_": "builtins.open", "file": "MARKER", "mode": "w"}},
    {**MODEL, "_target_": "transfer_lab.models.mlp.__globals__"},
])
def test_package_config_cannot_name_foreign_code(tmp_path, model, monkeypatch):
    """``_target_`` in a package is never instantiated unless it is a transfer_lab model builder."""
    monkeypatch.chdir(tmp_path)
    config = make_spec(json.loads(json.dumps(model)))
    pkg = write_package(tmp_path / "p.zip", {"w": torch.zeros(1)}, config)
    with pytest.raises(ConfigError) as e:
        import_package(pkg, SourceStore(tmp_path / "store"))
    assert "refused" in one_line(e) or "not a transfer_lab model" in str(e.value)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("key", ["../../escape", "f" * 20])
def test_package_key_must_be_the_hash_of_its_config(good, tmp_path, key):
    _, config, state = good
    pkg = write_package(tmp_path / "p.zip", state, {**config, "key": key})
    with pytest.raises(ConfigError, match="not the hash of its config") as e:
        import_package(pkg, SourceStore(tmp_path / "store"))
    one_line(e)
    assert not (tmp_path / "escape").exists()


def test_store_rejects_keys_that_are_paths(tmp_path):
    with pytest.raises(ConfigError, match="store key"):
        SourceStore(tmp_path / "s").entry("../x")


def test_checkpoint_that_does_not_fit_source_model_is_one_line(tmp_path):
    wrong = {k: torch.zeros(2, 2) for k in mlp(1, 16, 4, hidden=[8]).state_dict()}
    from safetensors.torch import save_file
    save_file(wrong, str(tmp_path / "w.safetensors"))
    cfg = compose_cfg("strategy=finetune", "model@source.model=mlp", "source.model.hidden=[8]",
                      f"source.checkpoint={tmp_path / 'w.safetensors'}", store=tmp_path / "s")
    with pytest.raises(ConfigError, match="source.checkpoint=.*shape"):
        run(cfg, tmp_path / "out")


# --- trainable-only checkpoints --------------------------------------------------------------
def test_trainable_checkpoint_refuses_foreign_or_mismatched_files(tmp_path):
    model = mlp(1, 8, 3, hidden=[16])
    path = save_trainable(model, tmp_path / "t.safetensors", "abc")
    assert load_trainable(mlp(1, 8, 3, hidden=[16]), path, source_key="abc") == "abc"
    with pytest.raises(ConfigError, match="trained on source abc, not def"):
        load_trainable(mlp(1, 8, 3, hidden=[16]), path, source_key="def")
    with pytest.raises(ConfigError, match=r"does not fit the model"):
        load_trainable(mlp(1, 8, 3, hidden=[32]), path)
    (tmp_path / "foreign.safetensors").write_bytes(st_save({"w": torch.zeros(1)}))
    with pytest.raises(ConfigError, match="format None"):
        load_trainable(model, tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ConfigError, match="not a readable .safetensors") as e:
        load_trainable(model, tmp_path / "junk.safetensors")
    one_line(e)
    half = path.read_bytes()[: len(path.read_bytes()) // 2]
    (tmp_path / "half.safetensors").write_bytes(half)
    with pytest.raises(ConfigError):
        load_trainable(model, tmp_path / "half.safetensors")
