"""Output paths are checked before any work; --overwrite replaces only what finegrain wrote;
command-line numbers are range-checked; a bad TVM target is refused before building."""
import pytest

import finegrain.models
from finegrain.cli import main
from finegrain.errors import InputError


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts loading a model (the slow part) before refusing."""
    def boom(*a, **k):
        raise AssertionError("the command started working before checking its output path")
    monkeypatch.setattr(finegrain.models, "load_model", boom)


def _err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_quantize_out_under_a_file(tmp_path, no_work, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["quantize", "--model", "smollm2-135m", "--recipe", "w8a16", "--out", str(tmp_path / "file" / "a")]) == 2
    assert "not a writable directory" in _err(capsys)


def test_overwrite_refuses_a_foreign_directory(tmp_path, no_work, capsys):
    d = tmp_path / "home"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    for cmd in (["quantize", "--model", "smollm2-135m", "--recipe", "w8a16"], ["demo"]):
        assert main([*cmd, "--out", str(d)] + (["--overwrite"] if cmd[0] == "quantize" else [])) == 2
        assert "not a finegrain artifact" in _err(capsys)
    assert (d / "thesis.tex").read_text() == "precious"


def test_eval_json_path_checked_first(tmp_path, no_work, capsys):
    assert main(["eval", "--model", "smollm2-135m", "--json", str(tmp_path)]) == 2
    assert "is a directory" in _err(capsys)


def test_export_and_build_outputs_checked_first(saved, tmp_path, capsys, monkeypatch):
    import finegrain

    def boom(*a, **k):
        raise AssertionError("loaded the artifact before checking the output")
    monkeypatch.setattr(finegrain, "load", boom)
    assert main(["export", str(saved), "--onnx", str(tmp_path)]) == 2
    assert "is a directory" in _err(capsys)
    (tmp_path / "f").write_text("x")
    assert main(["export", str(saved), "--onnx", str(tmp_path / "f")]) == 2
    assert "already exists" in _err(capsys)
    assert main(["build", str(saved), "--out", str(tmp_path / "f" / "dep")]) == 2
    assert "not a writable directory" in _err(capsys)


@pytest.mark.tvm
@pytest.mark.parametrize("target,match", [
    ('{"kind": "llvm", "mcpu": "notacpu"}', "not a CPU LLVM knows"),
    ('{"kind": "llvm", "mtriple": "bogus-triple-x"}', "not a triple this LLVM knows"),
    ('{"kind": "llvm", "num-cores": 0}', "num-cores"),
    ('{"kind": "cuda"}', "only CPU"),
    ("llvm -mcpu=znver3", "give 'llvm'"),
])
def test_bad_tvm_target_refused_before_building(saved, tmp_path, capsys, monkeypatch, target, match):
    pytest.importorskip("tvm")
    import finegrain

    def boom(*a, **k):
        raise AssertionError("loaded the artifact before checking the target")
    monkeypatch.setattr(finegrain, "load", boom)
    assert main(["build", str(saved), "--out", str(tmp_path / "dep"), "--target", target]) == 2
    assert match in _err(capsys)
    assert not (tmp_path / "dep").exists()


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "x", "--max-windows", "-1"],
    ["eval", "--model", "x", "--seq-len", "0"],
    ["pareto", "--model", "x", "--out", "o", "--points", "0"],
    ["build", "a", "--out", "o", "--max-seq-len", "0"],
    ["build", "a", "--out", "o", "--tune-trials", "-3"],
    ["quantize", "--model", "x", "--recipe", "w8a8", "--out", "o", "--calibration-samples", "-1"],
    ["quantize", "--model", "x", "--recipe", "w8a8", "--out", "o", "--calibration-seq-len", "zero"],
])
def test_cli_numbers_range_checked(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --" in err and ("is outside" in err or "not an integer" in err)


def test_api_save_refuses_foreign_directory(compiled, tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "a.txt").write_text("1")
    with pytest.raises(InputError, match="not a finegrain artifact"):
        compiled("w8a8").save(d, overwrite=True)
