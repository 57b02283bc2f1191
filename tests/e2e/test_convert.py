"""Weights move between dfm and diffusers: the convert CLI and API, checked by diffusers' own loader."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.model_loading_utils import load_state_dict as diffusers_load_state_dict
from safetensors.torch import load_file, save_file
from support.errors import max_rel

from dfm.adapters.diffusers.wan_weights import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    load_wan_diffusers,
    save_wan_diffusers,
    spec_from_config,
)
from dfm.app.convert import export_wan, import_wan, load_weights_file, save_weights_file
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.specs import WAN_TINY, WanSpec

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


def _model(spec: WanSpec = WAN_TINY, seed: int = 0) -> WanTransformer:
    """A tiny network with every weight random (the default init zeroes the output projection)."""
    model = WanTransformer(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name else 0.0))
    return model


def _inputs(spec: WanSpec = WAN_TINY) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, spec.in_channels, 3, 4, 6, generator=g),
        torch.tensor([250.0, 900.0]),
        torch.randn(2, 5, spec.text_dim, generator=g),
    )


@torch.no_grad()
def _assert_same_function(ours: WanTransformer, theirs: WanTransformer3DModel) -> None:
    x, t, text = _inputs(ours.spec)
    assert max_rel(ours(x, t, text), theirs(x, t, text).sample) <= TOL


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _from_pretrained(path: Path) -> WanTransformer3DModel:
    """diffusers' ``from_pretrained``. It needs ``accelerate`` for WAN (fp32-kept modules); without it,
    diffusers' own config reader and safetensors loader with a strict ``load_state_dict`` stand in."""
    if importlib.util.find_spec("accelerate") is not None:
        return WanTransformer3DModel.from_pretrained(path)
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(path))
    index = path / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_NAME]
    state = {k: v for f in files for k, v in diffusers_load_state_dict(str(path / f)).items()}
    model.load_state_dict(state, strict=True)
    return model


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dfm.app.convert", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_export_loads_in_diffusers_and_imports_back_identically(tmp_path: Path) -> None:
    model = _model()
    weights = save_weights_file(model.state_dict(), WAN_TINY, tmp_path / "tiny.safetensors")

    done = _cli("export", "--from", str(weights), "--out", str(tmp_path / "diffusers"))
    assert done.returncode == 0, done.stderr
    assert "exported" in done.stdout
    theirs = _from_pretrained(tmp_path / "diffusers")
    _assert_same_function(model, theirs)

    done = _cli("import", "--from", str(tmp_path / "diffusers"), "--out", str(tmp_path / "back.safetensors"))
    assert done.returncode == 0, done.stderr
    spec, state = load_weights_file(tmp_path / "back.safetensors")
    assert spec == WAN_TINY
    _assert_same_weights(state, model.state_dict())


def test_api_export_then_import_round_trips(tmp_path: Path) -> None:
    model = _model()
    out = export_wan(model, WAN_TINY, tmp_path / "out")
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and "_diffusers_version" in config
    assert config["image_dim"] is None and config["added_kv_proj_dim"] is None and config["pos_embed_seq_len"] is None
    assert "arch" not in config and config["patch_size"] == [1, 2, 2]
    _assert_same_function(model, _from_pretrained(out))

    back = import_wan(out)
    assert back.spec == WAN_TINY
    _assert_same_weights(back.state_dict(), model.state_dict())
    x, t, text = _inputs()
    with torch.no_grad():
        assert torch.equal(back(x, t, text), model(x, t, text))


def test_export_in_bf16_and_sharded(tmp_path: Path) -> None:
    model = _model()
    out = export_wan(model, WAN_TINY, tmp_path / "out", dtype=torch.bfloat16, max_shard_bytes=4000)
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / WEIGHTS_NAME).exists()
    assert {t.dtype for f in set(index["weight_map"].values()) for t in load_file(out / f).values()} == {torch.bfloat16}
    expected = {k: v.bfloat16() for k, v in model.state_dict().items()}
    theirs = _from_pretrained(out)  # diffusers upcasts to float32 unless asked for a torch_dtype
    _assert_same_weights({k: v.bfloat16() for k, v in theirs.state_dict().items()}, expected)
    back = import_wan(out)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    _assert_same_weights(back.state_dict(), expected)


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_diffusers_save_pretrained_dir_imports(tmp_path: Path, shard: str | None) -> None:
    spec = attrs.evolve(WAN_TINY, attention_head_dim=16, num_layers=3)
    theirs = WanTransformer3DModel(**{f.name: getattr(spec, f.name) for f in attrs.fields(WanSpec) if f.name != "arch"})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "ref", **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "ref" / (INDEX_NAME if shard else WEIGHTS_NAME)).is_file()

    ours = import_wan(tmp_path / "ref")
    assert ours.spec == spec
    _assert_same_function(ours, theirs)


def _write_dir(path: Path, config: dict | None, weights: dict[str, torch.Tensor] | None) -> Path:
    path.mkdir(parents=True)
    if config is not None:
        (path / CONFIG_NAME).write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, path / WEIGHTS_NAME)
    return path


def _good(tmp_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    src = save_wan_diffusers(_model().state_dict(), WAN_TINY, tmp_path / "good")
    return json.loads((src / CONFIG_NAME).read_text()), load_file(src / WEIGHTS_NAME)


def _bad_dirs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    config, weights = _good(tmp_path)
    missing = dict(weights)
    del missing["blocks.1.attn2.to_k.bias"]
    wrong = {**weights, "proj_out.weight": torch.zeros(7, 24)}
    pickled = _write_dir(tmp_path / "pickled", config, None)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    (tmp_path / "not_json").mkdir()
    (tmp_path / "not_json" / CONFIG_NAME).write_text("{oops")
    return {
        "no_dir": (tmp_path / "nope", r"nope: no such directory"),
        "no_config": (_write_dir(tmp_path / "a", None, weights), r"a/config\.json: missing"),
        "not_json": (tmp_path / "not_json", r"not_json/config\.json: not valid JSON"),
        "other_class": (
            _write_dir(tmp_path / "b", {**config, "_class_name": "FluxTransformer2DModel"}, weights),
            r"b/config\.json: _class_name is 'FluxTransformer2DModel', expected 'WanTransformer3DModel'",
        ),
        "i2v": (
            _write_dir(tmp_path / "c", {**config, "image_dim": 1280, "added_kv_proj_dim": 5120}, weights),
            r"c/config\.json: invalid WAN config: added_kv_proj_dim must equal the hidden size",
        ),
        "bad_value": (
            _write_dir(tmp_path / "d", {**config, "num_layers": 0}, weights),
            r"d/config\.json: invalid WAN config: .*num_layers",
        ),
        "no_weights": (_write_dir(tmp_path / "e", config, None), r"e/diffusion_pytorch_model\.safetensors: missing"),
        "pickle_only": (pickled, r"found only pickle weights \['diffusion_pytorch_model\.bin'\]"),
        "missing_key": (
            _write_dir(tmp_path / "f", config, missing),
            r"f: weights do not fit the WAN config: missing keys \[blocks\.1\.attn2\.to_k\.bias\]",
        ),
        "wrong_shape": (
            _write_dir(tmp_path / "g", config, wrong),
            r"shape mismatches \[proj_out\.weight is \(7, 24\), expected \(16, 24\)\]",
        ),
    }


BAD = ["no_dir", "no_config", "not_json", "other_class", "i2v", "bad_value", "no_weights", "pickle_only"]


@pytest.mark.parametrize("case", [*BAD, "missing_key", "wrong_shape"])
def test_bad_dirs_give_documented_errors(tmp_path: Path, case: str) -> None:
    path, message = _bad_dirs(tmp_path)[case]
    with pytest.raises(ValueError, match=message):
        import_wan(path)


def test_cli_reports_user_errors_in_one_line_with_status_2(tmp_path: Path) -> None:
    cases = _bad_dirs(tmp_path)
    path, _ = cases["no_config"]
    done = _cli("import", "--from", str(path), "--out", str(tmp_path / "x.safetensors"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "config.json: missing" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x.safetensors").exists()

    good = save_weights_file(_model().state_dict(), WAN_TINY, tmp_path / "w.safetensors")
    done = _cli("export", "--from", str(good), "--out", str(cases["other_class"][0]))
    assert done.returncode == 2 and "already holds" in done.stderr and "Traceback" not in done.stderr
    done = _cli("export", "--from", str(good), "--out", str(cases["other_class"][0]), "--overwrite")
    assert done.returncode == 0, done.stderr
    assert load_wan_diffusers(cases["other_class"][0])[0] == WAN_TINY


def test_load_weights_file_rejects_files_without_a_spec(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"plain\.safetensors: no 'dfm\.spec' in its metadata"):
        load_weights_file(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_weights_file(tmp_path / "junk.safetensors")


def test_export_checks_the_spec_describes_the_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not describe the model"):
        export_wan(_model(), attrs.evolve(WAN_TINY, num_layers=3), tmp_path / "out")


def test_config_keys_left_out_take_diffusers_defaults() -> None:
    spec = spec_from_config({"_class_name": "WanTransformer3DModel", "num_layers": 2, "out_channels": None})
    assert (spec.num_attention_heads, spec.ffn_dim, spec.num_layers, spec.out_channels) == (40, 13824, 2, 16)
