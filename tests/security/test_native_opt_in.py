"""A TVM deployment is code: its model.so runs when loaded. finegrain.load / finegrain eval load
one only when asked explicitly (allow_native=True / --allow-native)."""
import json
import shutil
import subprocess

import pytest

import finegrain
from finegrain.cli import main
from finegrain.errors import ArtifactError
from finegrain.io.files import dumps_json, file_records


@pytest.fixture
def hostile_deployment(tmp_path):
    """A deployment directory whose model.so creates a file the moment it is loaded."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the hostile library")
    flag = tmp_path / "library-ran"
    src = tmp_path / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) {\n'
                   f'  FILE *f = fopen("{flag}", "w"); if (f) fclose(f);\n}}\n')
    d = tmp_path / "dep"
    d.mkdir()
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(d / "model.so"), str(src)], check=True)
    (d / "params.bin").write_bytes(b"\0" * 16)
    manifest = {"finegrain_tvm_deploy": 2, "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, 4],
                                                       "dynamic_dims": [1]}],
                "functions": {"decode": {"seq_len": [1, 1]}}, "params": [],
                "files": file_records(d, ["model.so", "params.bin"])}
    (d / "manifest.json").write_text(dumps_json(manifest))
    return d, flag


def test_load_refuses_native_code_by_default(hostile_deployment):
    d, flag = hostile_deployment
    with pytest.raises(ArtifactError, match="holds native code .* allow_native=True"):
        finegrain.load(d)
    assert not flag.exists()


def test_cli_eval_refuses_without_allow_native(hostile_deployment, capsys):
    d, flag = hostile_deployment
    assert main(["eval", "--model", str(d), "--max-windows", "1", "--seq-len", "8"]) == 2
    assert "--allow-native" in capsys.readouterr().err
    assert not flag.exists()


@pytest.mark.tvm
def test_the_opt_in_really_loads_code(hostile_deployment):
    """Why the opt-in exists: with allow_native=True the library's code runs."""
    pytest.importorskip("tvm")
    d, flag = hostile_deployment
    try:
        finegrain.load(d, allow_native=True)
    except Exception:
        pass  # not a real TVM module; its constructor has run all the same
    assert flag.exists()


def test_build_refuses_a_deployment_as_input(hostile_deployment, tmp_path):
    d, flag = hostile_deployment
    assert main(["build", str(d), "--out", str(tmp_path / "x")]) == 2
    assert not flag.exists()
