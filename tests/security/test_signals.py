"""SIGTERM, like Ctrl-C, removes the temporary directory of a save in progress."""
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = """
import sys, time
from pathlib import Path
from finegrain.cli import install_signal_handlers
from finegrain.io.files import atomic_directory
install_signal_handlers()
with atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "partial.bin").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_temporary_directory(tmp_path, sig):
    out = tmp_path / "artifact"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], stdout=subprocess.PIPE, text=True)
    tmp = proc.stdout.readline().strip()
    assert tmp and (tmp_path / tmp.rsplit("/", 1)[1]).is_dir()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    time.sleep(0.1)
    assert list(tmp_path.iterdir()) == [], "a temporary directory was left behind"
