"""The distribution: editable install and built wheel both import `deeprecon.*`; the
runtime core imports without torch."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE_MODULES = [
    "deeprecon.runtime", "deeprecon.runtime.errors", "deeprecon.runtime.study",
    "deeprecon.runtime.io", "deeprecon.runtime.preprocess", "deeprecon.runtime.localize",
    "deeprecon.runtime.phantom", "deeprecon.runtime.metrics", "deeprecon.runtime.measures",
    "deeprecon.runtime.qc", "deeprecon.runtime.cli", "deeprecon.runtime.bundle",
    "deeprecon.runtime.result", "deeprecon.runtime.backends", "deeprecon.runtime.pipeline",
    "deeprecon.runtime.motion", "deeprecon.runtime.outputs", "deeprecon.runtime.report",
]

BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def _py(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, **kw)


def test_editable_install_maps_folders():
    p = _py("import deeprecon.runtime as r, deeprecon.trainer as t, deeprecon.export as e, "
            "deeprecon.cpp_ext as c; print(r.__file__); print(c.__file__)", cwd="/")
    assert p.returncode == 0, p.stderr
    runtime_file, cpp_file = p.stdout.split()
    assert Path(runtime_file).parent.name == "runtime"
    assert Path(cpp_file).parent.name == "cpp_ext"


def test_runtime_core_imports_without_torch():
    code = BLOCK_TORCH + "".join(f"import {m}\n" for m in CORE_MODULES) + \
        "assert 'torch' not in sys.modules\nprint('ok')"
    p = _py(code, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_reconstruct_without_torch_names_what_is_missing(tiny_bundle):
    """The torch backend on a machine without torch: exit 69 naming the extra, and the
    bundle (hashes, manifest) is still checked without torch."""
    code = BLOCK_TORCH + (
        "from deeprecon.runtime.cli import run\n"
        f"rc = run(['bundle', 'info', {str(tiny_bundle)!r}, '--json'])\n"
        "assert rc == 0, rc\n"
        f"rc = run(['reconstruct', 'nowhere', '-o', 'x', '--bundle', {str(tiny_bundle)!r}])\n"
        "assert rc == 66, rc\n"
        "from deeprecon.runtime import Reconstructor\n"
        "from deeprecon.runtime.errors import UnavailableError\n"
        "try:\n"
        f"    Reconstructor({str(tiny_bundle)!r})\n"
        "except UnavailableError as e:\n"
        "    print(e)\n")
    p = _py(code, cwd="/")
    assert p.returncode == 0, p.stderr
    assert "torch" in p.stdout and "deeprecon-rt[torch]" in p.stdout


@pytest.mark.slow
def test_wheel_builds_installs_and_imports(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                        "--no-deps", "-w", str(wheel_dir), str(REPO)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    wheels = list(wheel_dir.glob("deeprecon_rt-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    for f in ("deeprecon/runtime/study.py", "deeprecon/runtime/cli.py",
              "deeprecon/cpp_ext/__init__.py", "deeprecon/trainer/__init__.py",
              "deeprecon/export/__init__.py", "deeprecon/trainer/stages/gan.py",
              "deeprecon/trainer/splits/acdc.json"):
        assert f in names, f
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "deeprecon.trainer.cli:app" in zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    assert not any(n.startswith(("tests/", "benchmarks/", "deeprecon/tests")) for n in names)
    assert not any(n.endswith("setup.py") for n in names)
    # the compiled kernel travels in the wheel (torch is installed here)
    assert any(n.startswith("deeprecon/cpp_ext/_C") and n.endswith((".so", ".pyd")) for n in names)
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(target), str(wheels[0])], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _py(f"import sys; sys.path.insert(0, {str(target)!r})\n"
            "import deeprecon.runtime.study as s, deeprecon.cpp_ext as c\n"
            "from deeprecon.trainer.split import load_split\n"
            "assert len(load_split('acdc')['train']) == 60\n"
            "print(s.__file__)", cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(str(target))
