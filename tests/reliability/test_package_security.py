"""A knowledge package (or store entry) is data: reading one never runs code, never takes more
memory than the model it describes, and follows no symlink; every refusal is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, compose_cfg
from reliability.test_safe_loading import MODEL, make_spec, one_line, write_package
from transfer_lab.errors import ConfigError
from transfer_lab.models import convnet, mlp
from transfer_lab.run import run
from transfer_lab.store import SourceStore
from transfer_lab.package import export_package, import_package, load_state_dict, read_package

STATE = mlp(1, 8, 3, hidden=[16], batch_norm=True).state_dict()


def payload(victim: Path) -> str:
    """The issue's exploit: resolved by OmegaConf, it becomes a node Hydra instantiates as
    ``open(victim, "w")`` (which empties the file)."""
    return f"${{oc.create:${{oc.decode:'{{_target_: builtins.open, _args_: [{victim}, w]}}'}}}}"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("precious")
    return path


def evil_package(path: Path, victim: Path, where: str = "hidden") -> Path:
    model = {**MODEL, where: payload(victim)} if where != "data" else dict(MODEL)
    spec = {"model": model, "input_shape": [1, 8, 8], "num_classes": 3, "seed": 0}
    if where == "data":
        spec["data"] = {"_target_": "transfer_lab.data.SyntheticData", "classes": payload(victim)}
    return write_package(path, STATE, spec)  # no key: the key check must not be what saves us


# --- the oc.create package through every door ----------------------------------------------------
@pytest.mark.parametrize("where", ["hidden", "dropout", "data"])
def test_resolver_package_is_refused_by_import_and_runs_nothing(tmp_path, victim, where):
    pkg = evil_package(tmp_path / "evil.zip", victim, where)
    with pytest.raises(ConfigError) as e:
        import_package(pkg, SourceStore(tmp_path / "store"))
    assert victim.read_text() == "precious"
    assert str(pkg) in one_line(e) and "interpolation" in one_line(e)


def test_resolver_package_is_refused_by_read_package_and_source_checkpoint_loader(tmp_path, victim):
    pkg = evil_package(tmp_path / "evil.zip", victim)
    for read in (read_package, load_state_dict):
        with pytest.raises(ConfigError) as e:
            read(pkg)
        assert victim.read_text() == "precious", read.__name__
        assert "interpolation" in one_line(e)


def test_resolver_package_as_source_checkpoint_stops_the_run(tmp_path, victim):
    pkg = evil_package(tmp_path / "evil.zip", victim)
    cfg = compose_cfg("strategy=finetune", "model@source.model=mlp", f"source.checkpoint={pkg}",
                      store=tmp_path / "store")
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path / "out")
    assert victim.read_text() == "precious"
    assert "interpolation" in one_line(e)
    assert not (tmp_path / "out" / "results.json").exists() or \
        json.loads((tmp_path / "out" / "results.json").read_text()).get("status") != "ok"


@pytest.mark.slow
def test_resolver_package_on_the_command_line_exits_2_with_one_line(tmp_path, victim):
    pkg = evil_package(tmp_path / "evil.zip", victim)
    cmd = [sys.executable, "-m", "transfer_lab.train", f"hydra.run.dir={tmp_path}/run",
           "data@source.data=synthetic", "data@target.data=synthetic", "model@source.model=mlp",
           "trainer.accelerator=cpu", "transferability=false", f"source.checkpoint={pkg}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT),
                              "TRANSFER_LAB_STORE": str(tmp_path / "store")})
    assert victim.read_text() == "precious"
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"error: knowledge package {pkg}") and "interpolation" in lines[-1]
    assert "Traceback" not in out.stderr


def test_resolver_package_directory_is_refused_too(tmp_path, victim):
    pkg = evil_package(tmp_path / "evil.zip", victim)
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(pkg) as z:
        z.extractall(unpacked)
    with pytest.raises(ConfigError) as e:
        load_state_dict(unpacked)
    assert victim.read_text() == "precious"
    assert "interpolation" in one_line(e)


# --- the config: allow-listed factory, its signature, plain values ------------------------------
@pytest.mark.parametrize("model, match", [
    ({**MODEL, "hidden": {"_target_": "transfer_lab.models.mlp"}}, "nested _target_"),
    ({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 2}, "not an allowed model factory"),
    ({"_target_": "builtins.exec", "source": "1"}, "not an allowed model factory"),
    ({**MODEL, "_target_": "transfer_lab.models.backbones.mlp"}, "not an allowed model factory"),
    ({**MODEL, "_target_": "transfer_lab.models.Classifier"}, "not an allowed model factory"),
    ({**MODEL, "_target_": "transfer_lab.models.timm_evil"}, "not an allowed model factory"),
    ({**MODEL, "_args_": [1]}, "model._args_: not an option"),
    ({**MODEL, "_partial_": True}, "model._partial_: not an option"),
    ({**MODEL, "_recursive_": False}, "model._recursive_: not an option"),
    ({**MODEL, "in_channels": 3}, "model.in_channels: not an option"),
    ({**MODEL, "width": 3}, "model.width: not an option of transfer_lab.models.mlp"),
    ({**MODEL, "hidden": "16"}, r"model.hidden=\"16\": expected Sequence\[int\]"),
    ({**MODEL, "hidden": [16.5]}, "model.hidden=.*expected"),
    ({**MODEL, "hidden": [True]}, "model.hidden=.*expected"),
    ({**MODEL, "hidden": [10**12]}, "model.hidden=.*within"),
    ({**MODEL, "hidden": [1] * 1000}, "at most 64 items"),
    ({**MODEL, "dropout": "0.5"}, "model.dropout=.*expected float"),
    ({**MODEL, "batch_norm": 1}, "model.batch_norm=1: expected bool"),
    ({**MODEL, "dropout": 1.5}, "builds no model"),
    ({"_target_": "transfer_lab.models.resnet_cifar", "depth": 9}, "builds no model"),
])
def test_model_config_is_checked_against_its_factory(tmp_path, model, match):
    pkg = write_package(tmp_path / "p.zip", STATE, make_spec(model))
    with pytest.raises(ConfigError, match=match) as e:
        import_package(pkg, SourceStore(tmp_path / "store"))
    assert str(pkg) in one_line(e)
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").glob("*/manifest.json"))


@pytest.mark.parametrize("change, match", [
    ({"input_shape": [1, 8]}, "input_shape"),
    ({"input_shape": [1, 8, 8.0]}, "input_shape"),
    ({"num_classes": True}, "num_classes"),
    ({"optimizer": {"_target_": "os.system", "command": "true"}}, r"config.optimizer._target_='os.system'"),
    ({"note": {"${oc.env:HOME}": 1}}, "interpolation"),
])
def test_top_level_config_values_are_data(tmp_path, change, match):
    spec = {**make_spec(), **change}
    spec.pop("key")
    with pytest.raises(ConfigError, match=match) as e:
        read_package(write_package(tmp_path / "p.zip", STATE, spec))
    one_line(e)


@pytest.mark.parametrize("raw, match", [
    (b'{"model": {}, "model": {}}', "repeats key"),
    (b'{"x": NaN}', "NaN"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON or nests too deep"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
])
def test_config_json_that_is_not_plain_data_is_refused(tmp_path, raw, match):
    from transfer_lab.model_spec import parse_config

    with pytest.raises(ConfigError, match=match) as e:
        parse_config(raw, "p.zip")
    one_line(e)


def test_allow_list_covers_every_model_yaml_and_builds_it():
    """Each conf/model/*.yaml model can travel in a package: its factory is allow-listed and
    ``build_model_from_spec`` builds the same architecture as the factory called directly."""
    import yaml

    from transfer_lab.model_spec import build_model_from_spec

    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        node = yaml.safe_load(path.read_text())
        config = {"model": node, "input_shape": [3, 32, 32], "num_classes": 10}
        built = build_model_from_spec(config, path.name, device="meta")
        assert type(built).__name__ == "Classifier", path.name
    net = build_model_from_spec({"model": {"_target_": "transfer_lab.models.convnet", "channels": [4, 8]},
                                 "input_shape": [1, 12, 12], "num_classes": 5}, "x")
    ref = convnet(1, 12, 5, channels=[4, 8])
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert net.state_dict()["head.weight"].device.type == "cpu"


def test_a_file_config_never_fetches_or_reads_weights(tmp_path):
    """``weights``/``checkpoint`` in a file's config are built as None: the package's tensors are
    the weights (a download here would fail: no network; a path would read a local file)."""
    from transfer_lab.model_spec import build_model_from_spec

    config = {"model": {"_target_": "transfer_lab.models.torchvision_model", "arch": "resnet18",
                        "weights": "IMAGENET1K_V1", "checkpoint": str(tmp_path / "missing.safetensors")},
              "input_shape": [3, 32, 32], "num_classes": 4}
    assert build_model_from_spec(config, "x", device="meta").num_classes == 4


def test_store_entries_follow_the_same_rule(tmp_path, caplog):
    """A store entry whose config holds an interpolation is invalid (retrained, the log says why),
    and an entry whose model is not allow-listed is not exported as a package."""
    store = SourceStore(tmp_path / "store")
    key = "0123456789abcdef0123"
    store.save(key, STATE, {"model": MODEL, "input_shape": [1, 8, 8], "num_classes": 3,
                            "note": "${oc.env:HOME}"}, {})
    assert not store.is_valid(key)
    with caplog.at_level("WARNING", logger="transfer_lab.store"):
        store.get_or_create(key, lambda: (STATE, {"model": MODEL, "input_shape": [1, 8, 8],
                                                  "num_classes": 3}, {}))
    assert any("interpolation" in r.getMessage() and key in r.getMessage() for r in caplog.records)
    store.save(key, STATE, {"model": {"_target_": "mypkg.Net"}, "input_shape": [1, 8, 8],
                            "optimizer": {"_target_": "mylib.Lion"}, "num_classes": 3}, {})
    assert store.is_valid(key)  # the user's own model and optimizer: the store never builds them
    with pytest.raises(ConfigError, match="mylib.Lion' is not a record"):
        export_package(store, key, tmp_path / "p.zip")
    store.save(key, STATE, {"model": {"_target_": "mypkg.Net"}, "input_shape": [1, 8, 8],
                            "num_classes": 3}, {})
    with pytest.raises(ConfigError, match="'mypkg.Net' is not an allowed model factory"):
        export_package(store, key, tmp_path / "p.zip")
    assert not (tmp_path / "p.zip").exists()
