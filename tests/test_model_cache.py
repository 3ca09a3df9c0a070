"""The converted-model cache is checked before it is served: damage is reported and rebuilt, never loaded."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from minisys.attention import AttentionMetadata
from minisys.model.manifest import MANIFEST, ensure_converted, verify


def _flip(path, offset: int, n: int) -> None:
    """Overwrite ``n`` bytes at ``offset`` with their complement (the file keeps its size)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(255 - b for b in data))


@pytest.fixture
def conversions(tiny_dirs):
    """A 'converter' that copies the tiny Llama directory, counting its runs."""
    runs = []

    def convert(tmp):
        runs.append(tmp)
        for f in tiny_dirs["llama"].iterdir():
            shutil.copy(f, tmp / f.name)
    return convert, runs


def _last_logits(path) -> torch.Tensor:
    from minisys.model.loader import load_model
    model = load_model(path, device="cpu", dtype=torch.float32)
    ids = torch.tensor([3, 1, 4, 1, 5])
    meta = AttentionMetadata(seqlens_q=[5], context_lens=[0])
    return model(ids, meta.positions(), meta, logits_indices=meta.last_token_indices())


def test_built_once_then_verified_not_rebuilt(tmp_path, conversions):
    convert, runs = conversions
    out = ensure_converted(tmp_path / "m", convert, "test")
    assert len(runs) == 1 and verify(out) == []
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in out.iterdir() if p.name != MANIFEST}
    ensure_converted(tmp_path / "m", convert, "test")
    assert len(runs) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "config", "delete", "no-manifest"])
def test_damaged_cache_is_reported_rebuilt_and_served_correctly(tmp_path, conversions, capsys, damage):
    convert, runs = conversions
    out = ensure_converted(tmp_path / "m", convert, "test")
    good = _last_logits(out)
    weights = next(out.glob("*.safetensors"))
    if damage == "flip":
        _flip(weights, weights.stat().st_size // 2, 4096)
    elif damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 100)
    elif damage == "config":
        (out / "config.json").write_text((out / "config.json").read_text().replace("}", ', "x": 1}', 1))
    elif damage == "delete":
        (out / "tokenizer.json").unlink()
    else:
        (out / MANIFEST).unlink()
    problems = verify(out)
    assert problems, "the damage went unnoticed"
    assert ensure_converted(tmp_path / "m", convert, "test") == out
    assert len(runs) == 2 and verify(out) == []
    if damage != "no-manifest":
        name = {"flip": weights.name, "truncate": weights.name, "config": "config.json",
                "delete": "tokenizer.json"}[damage]
        err = capsys.readouterr().err
        assert name in err and "--rebuild-cache" in err   # the report names the file and the fix
    assert torch.equal(_last_logits(out), good)      # what is served is the model, not the damage


def test_rebuild_forces_a_new_conversion(tmp_path, conversions):
    convert, runs = conversions
    ensure_converted(tmp_path / "m", convert, "test")
    ensure_converted(tmp_path / "m", convert, "test", rebuild=True)
    assert len(runs) == 2


def test_a_cache_that_still_fails_after_rebuilding_is_refused(tmp_path, monkeypatch):
    """Storage that damages what it is given: the rebuilt directory fails its check too -> refused, with the fix."""
    import minisys.model.manifest as manifest
    real = manifest.write_manifest

    def write_then_damage(directory, source):
        real(directory, source)
        (directory / "config.json").write_text("{  }")
    monkeypatch.setattr(manifest, "write_manifest", write_then_damage)
    with pytest.raises(RuntimeError, match=r"config.json.*Delete .* --rebuild-cache"):
        ensure_converted(tmp_path / "m", lambda tmp: (tmp / "config.json").write_text("{}"), "test")


def test_a_bad_config_in_a_user_directory_is_a_clear_error(tmp_path, tiny_dirs):
    from minisys.model.loader import load
    d = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], d)
    (d / "config.json").write_text('{"hidden_size": ')
    with pytest.raises(ValueError, match=r"config.json is not a valid model config"):
        load(str(d), device="cpu")


def test_truncated_weights_in_a_user_directory_are_a_clear_error(tmp_path, tiny_dirs):
    from minisys.model.loader import load
    d = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], d)
    weights = next(d.glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"cannot read the weights in .*safetensors"):
        load(str(d), device="cpu")


@pytest.mark.slow
def test_the_default_model_cache_with_4mb_overwritten_is_rebuilt_not_served(tmp_path, monkeypatch, smol,
                                                                          smol_gguf_path, capsys):
    """The issue's reproduction on the real default model, in a private cache (the GGUF is copied in)."""
    from minisys.model import store
    from minisys.model.loader import load
    monkeypatch.setenv("MINISYS_CACHE", str(tmp_path))
    (tmp_path / store.DEFAULT_MODEL.name).mkdir()
    shutil.copy(smol_gguf_path, tmp_path / store.DEFAULT_MODEL.name / smol_gguf_path.name)
    monkeypatch.setattr(store.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("pip called")))
    out = store.default_model_dir(quiet=True)
    _flip(out / "model.safetensors", 10_000_000, 4 << 20)
    model, tok = load(None, device="cpu", dtype=torch.float32, quiet=True)
    assert "model.safetensors" in capsys.readouterr().err and verify(out) == []
    ref_model, _ = smol
    ids = torch.tensor(tok.encode("The capital of France is"))
    meta = AttentionMetadata(seqlens_q=[len(ids)], context_lens=[0])
    got = model(ids, meta.positions(), meta, logits_indices=meta.last_token_indices())
    want = ref_model(ids, meta.positions(), meta, logits_indices=meta.last_token_indices())
    assert torch.equal(got, want)
