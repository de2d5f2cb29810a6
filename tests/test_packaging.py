"""Built-in algorithms and the package's data load from a wheel install, not only from the source
checkout."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import algorithms, pflbench.core.registry as r
from pflbench.analysis.published import load_published
r.load_algorithms()
print(algorithms.__file__)
print(sorted(r.ALGORITHMS))
print(len(load_published()))
"""


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools to build")
def test_wheel_install_registers_every_builtin(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheel_dir), str(REPO)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("pflbench-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                              str(target), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert probe.returncode == 0, probe.stderr
    location, names, published_rows = probe.stdout.strip().splitlines()
    assert int(published_rows) > 0  # the published numbers ship with the package
    assert location.startswith(str(target))
    for name in ("fedavg", "local", "fedper", "fedrep", "fedbabu", "lgfedavg", "fedobp"):
        assert f"'{name}'" in names
