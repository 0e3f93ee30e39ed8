"""The manifest's file names cannot reach outside the artifact, sizes are checked before reading,
and files the manifest does not list are never loaded."""
import json
import os

import pytest

import finegrain
from finegrain.errors import ArtifactError
from finegrain.io.files import file_records


def _add_listed(m, path, name, target):
    m["files"][name] = file_records(target.parent, [target.name])[target.name]


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.json", "tokenizer/../../x", "a//b", "./graph.json",
                                  "C:\\x", "", "x" * 300])
def test_bad_file_names_refused(tamper, name):
    def edit(m):
        m["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    with pytest.raises(ArtifactError, match="not a plain relative path"):
        finegrain.load(tamper(manifest=edit))


def test_symlink_out_of_the_directory_refused(tamper, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")

    def files(d):
        (d / "tokenizer" / "leak.json").symlink_to(secret)

    def edit(m):
        m["files"]["tokenizer/leak.json"] = file_records(tmp_path, ["secret.txt"])["secret.txt"]
    with pytest.raises(ArtifactError, match="resolves outside the artifact directory"):
        finegrain.load(tamper(files=files, manifest=edit))


def test_symlinked_weights_refused(tamper, tmp_path, saved):
    other = tmp_path / "elsewhere.safetensors"
    other.write_bytes((saved / "model.safetensors").read_bytes())

    def files(d):
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").symlink_to(other)
    with pytest.raises(ArtifactError, match="resolves outside"):
        finegrain.load(tamper(files=files))


def test_size_checked_before_reading(tamper):
    def edit(m):
        m["files"]["model.safetensors"]["bytes"] += 1
    with pytest.raises(ArtifactError, match="bytes, the manifest says"):
        finegrain.load(tamper(manifest=edit))


def test_required_files_must_be_listed(tamper):
    def edit(m):
        del m["files"]["graph.json"]
    with pytest.raises(ArtifactError, match="does not list graph.json"):
        finegrain.load(tamper(manifest=edit))


def test_unlisted_tokenizer_files_are_not_loaded(tamper, saved):
    """An extra file dropped into tokenizer/ (here: a new special token) is ignored."""
    base = finegrain.load(saved).tokenizer
    assert base is not None and "<evil>" not in base.get_vocab()

    def files(d):
        cfg = json.loads((d / "tokenizer" / "tokenizer_config.json").read_text())
        (d / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": ["<evil>"]}))
        (d / "tokenizer" / "added_tokens.json").write_text(json.dumps({"<evil>": len(base)}))
        assert "auto_map" not in cfg
    path = tamper(files=files)
    m = json.loads((path / "manifest.json").read_text())
    assert "tokenizer/added_tokens.json" not in m["files"]  # present on disk, not listed
    tok = finegrain.load(path).tokenizer
    assert "<evil>" not in tok.get_vocab() and len(tok) == len(base)


def test_tokenizer_remote_code_refused(tamper):
    """A listed tokenizer config asking for custom code (auto_map) does not load it."""
    def files(d):
        cfg = json.loads((d / "tokenizer" / "tokenizer_config.json").read_text())
        cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
        (d / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(cfg))
        (d / "tokenizer" / "evil.py").write_text("raise SystemExit('code ran')\n")

    def edit(m):
        d = path_holder[0]
        m["files"]["tokenizer/evil.py"] = file_records(d, ["tokenizer/evil.py"])["tokenizer/evil.py"]
    path_holder = []

    def files_and_remember(d):
        files(d)
        path_holder.append(d)
    path = tamper(files=files_and_remember, manifest=edit)
    with pytest.raises(ArtifactError, match="auto_map"):
        finegrain.load(path)


def test_manifest_not_json_or_too_large(saved, tmp_path):
    import shutil

    d = tmp_path / "a"
    shutil.copytree(saved, d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupted or unreadable"):
        finegrain.load(d)
    with open(d / "manifest.json", "wb") as f:  # sparse: 65 MB on paper, nothing read
        f.truncate(65 << 20)
    with pytest.raises(ArtifactError, match="more than"):
        finegrain.load(d)
    (d / "manifest.json").write_text("[]")
    with pytest.raises(ArtifactError, match="must hold a JSON object"):
        finegrain.load(d)
    os.remove(d / "manifest.json")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        finegrain.load(d)


def test_old_manifest_version_refused(tamper):
    def edit(m):
        m["finegrain_artifact"] = 1
        m["files"] = {k: v["sha256"] for k, v in m["files"].items()}
    with pytest.raises(ArtifactError, match="version 1 is not supported"):
        finegrain.load(tamper(manifest=edit))
