"""``make demo LIBVIRT=1`` (tests/libvirt/demo.py) runs its three scenarios and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.libvirt
DEMO = Path(__file__).resolve().parent / "demo.py"


def test_libvirt_demo_runs_the_three_scenarios() -> None:
    cp = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=300)
    out = cp.stdout
    print(out)
    assert cp.returncode == 0, out + cp.stderr
    assert re.search(r"refused: error: resource busy: .* held exclusive by domain web1 .* on host hostA", out), out
    tokens = re.search(r"token (\d+) -> (\d+)", out)
    assert tokens and int(tokens.group(2)) > int(tokens.group(1)), out
    assert re.search(r"after: +demo-web1.img held by web1 on hostB", out), out
    assert re.search(r"start db2 \(the same disk\) works [0-9.]+ s after the kill", out), out
    workdir = re.search(r"etcd in (\S+)", out)
    assert workdir and not Path(workdir.group(1)).exists(), "the demo left its work directory"
    assert "done, nothing left behind" in out
