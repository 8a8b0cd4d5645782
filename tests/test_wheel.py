"""The package as users get it: build the wheel, install it into a fresh venv, run it there.

Not the checkout: the smoke test (``tests/smoke/wheel_smoke.py``: master + 2 peers, an
all-reduce and DiLoCo steps) runs with the fresh venv's interpreter from a temporary directory
and asserts ``pccl`` comes from that venv's site-packages. Needs the package registry (as CI
has) for the dependencies; torch is pinned as everywhere in this repo.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pccl

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    out = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    # one stable-ABI wheel per platform, named after the distribution (not the index's "pccl")
    assert wheel.name.startswith(f"pccl_ft-{pccl.__version__}-cp311-abi3-"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("pccl/_native.abi3") for n in names), names
    assert any(n.startswith("pccl/_shm.abi3") for n in names), names
    assert not any(n.startswith(("tests/", "examples/", "native/")) for n in names)
    venv = tmp_path / "venv"
    out = _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    assert out.returncode == 0, out.stderr
    py = venv / "bin" / "python"
    out = _run(
        [str(py), "-m", "pip", "install", "-q", "torch==2.13.0", f"{wheel}[torch]"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    show = _run([str(py), "-m", "pip", "show", "pccl-ft"], tmp_path)
    meta = dict(line.split(": ", 1) for line in show.stdout.splitlines() if ": " in line)
    assert meta["Name"] == "pccl-ft" and meta["Version"] == pccl.__version__, show.stdout
    assert "numpy" in meta["Requires"] and "msgpack" in meta["Requires"], show.stdout
    lic = _run(  # (older pip show prints no License-Expression: read the metadata itself)
        [
            str(py),
            "-c",
            "import importlib.metadata as m; print(m.metadata('pccl-ft')['License-Expression'])",
        ],
        tmp_path,
    )
    assert lic.stdout.strip() == "MIT", lic
    assert meta["Summary"] and meta["Location"].startswith(str(venv)), show.stdout
    out = _run([str(py), str(ROOT / "tests" / "smoke" / "wheel_smoke.py")], tmp_path, 300)
    assert out.returncode == 0 and "smoke ok" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    ver = _run([str(venv / "bin" / "pccl"), "--version"], tmp_path)
    assert ver.stdout.strip() == f"pccl {pccl.__version__}", ver
