"""The distribution: editable install and built wheel both import `deeprecon.*`; the
runtime core imports without torch; the lean install (core + onnx: no torch, matplotlib,
typer or rich) runs `study info`'s code path and the console script says which extra it
lacks; a reference bundle placed in runtime/models/reference ships in the wheel (checked
with a fake bundle in a temporary copy of the tree: nothing is written into the tree, and
the real bundle need not exist)."""
from __future__ import annotations

import json
import os
import shutil
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
    "deeprecon.runtime.motion", "deeprecon.runtime.outputs", "deeprecon.runtime.outputs.folder",
    "deeprecon.runtime.outputs.volumes", "deeprecon.runtime.outputs.tables",
    "deeprecon.runtime.outputs.pictures", "deeprecon.runtime.outputs.run_report",
    "deeprecon.runtime.outputs.html_report", "deeprecon.runtime.publish",
    "deeprecon.runtime.signals", "deeprecon.runtime.jsonsafe", "deeprecon.runtime.console",
    "deeprecon.runtime.inversion", "deeprecon.runtime.backends.base",
    "deeprecon.runtime.backends.onnxruntime_backend", "deeprecon.cpp_ext.numpy_ops",
]
#: what the lean install (the core dependencies and the onnx extra) does not have
NOT_LEAN = ("torch", "matplotlib", "PIL", "typer", "rich")


def block_modules(*names: str) -> str:
    """Python source that makes ``names`` and their submodules unimportable in the process
    that runs it (as if not installed): how these tests stand in for a smaller install."""
    return f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {tuple(names)!r}:
            raise ModuleNotFoundError(f"{{name}} is blocked in this test", name=name)
sys.meta_path.insert(0, Block())
"""


BLOCK_TORCH = block_modules("torch")


#: a fake reference bundle: the kinds of file a real one holds, in its sub-folders
FAKE_BUNDLE = ("manifest.json", "weights/generator.safetensors", "programs/generator.pt2",
               "generator.onnx")
REFERENCE = "runtime/models/reference"


def _py(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, **kw)


def _copy_tree(dest: Path, *, only: tuple[str, ...] = ()) -> Path:
    """The working tree's files (tracked and untracked, not ignored; under ``only`` when
    given) copied to ``dest``, without any real reference bundle, plus FAKE_BUNDLE in
    runtime/models/reference."""
    p = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                        "--", *only], cwd=REPO, capture_output=True, timeout=60, check=True)
    for rel in sorted(set(p.stdout.decode().split("\0")) - {""}):
        src = REPO / rel
        if rel.startswith(REFERENCE + "/") or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for rel in FAKE_BUNDLE:
        f = dest / REFERENCE / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}\n" if rel.endswith(".json") else "fake")
    return dest


def test_editable_install_maps_folders():
    p = _py("import deeprecon.runtime as r, deeprecon.trainer as t, deeprecon.export as e, "
            "deeprecon.cpp_ext as c; print(r.__file__); print(c.__file__)", cwd="/")
    assert p.returncode == 0, p.stderr
    runtime_file, cpp_file = p.stdout.split()
    assert Path(runtime_file).parent.name == "runtime"
    assert Path(cpp_file).parent.name == "cpp_ext"
    # the editable install reads the reference bundle from the source tree
    p = _py("from deeprecon.runtime.bundle import SHIPPED_BUNDLE; print(SHIPPED_BUNDLE)", cwd="/")
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()) == (REPO / REFERENCE).resolve()


def test_reference_bundle_is_package_data(tmp_path):
    """setup.py's package_data takes every file of runtime/models/reference (manifest,
    weights, programs, ONNX graphs, in sub-folders) into the build: build_py of a copy of
    the packaging files and runtime/ with a fake bundle (seconds; the wheel test below
    checks the same in a real wheel)."""
    src = _copy_tree(tmp_path / "src", only=("setup.py", "pyproject.toml", "README.md",
                                             "runtime"))
    lib = tmp_path / "lib"
    p = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
                       cwd=src, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for rel in FAKE_BUNDLE:
        assert (lib / "deeprecon/runtime/models/reference" / rel).is_file(), rel
    assert (lib / "deeprecon/runtime/bundle.py").is_file()


def test_runtime_core_imports_without_torch():
    code = BLOCK_TORCH + "".join(f"import {m}\n" for m in CORE_MODULES) + \
        "assert 'torch' not in sys.modules\nprint('ok')"
    p = _py(code, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_lean_install_runs_study_info(tmp_path):
    """Only the core and the onnx extra: the whole runtime imports, a phantom is written
    (its preview left out with a warning naming the report extra) and study info's code
    path (load, acquisition check, describe) prints the study; with the cli extra back,
    `study info --json` runs through the CLI. torch and matplotlib are never imported."""
    code = block_modules(*NOT_LEAN) + "".join(
        f"import {m}\n" for m in CORE_MODULES if m != "deeprecon.runtime.cli") + (
        "import json, logging\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from deeprecon.runtime.phantom import make_phantom, write_phantom\n"
        "from deeprecon.runtime.io import check_acquisition, load_study\n"
        "ph = make_phantom(slices=4, phases=2, seed=0, matrix=(40, 40), pixel_spacing_mm=3.0)\n"
        f"files = write_phantom(ph, {str(tmp_path / 'study')!r}, preview=True)\n"
        "assert 'preview' not in files, files\n"
        f"desc = check_acquisition(load_study({str(tmp_path / 'study')!r})).describe()\n"
        "print(json.dumps(desc))\n"
        f"bad = [m for m in sys.modules if m.partition('.')[0] in {NOT_LEAN!r}]\n"
        "assert not bad, bad\n")
    p = _py(code, cwd="/")
    assert p.returncode == 0, p.stderr[-3000:]
    desc = json.loads(p.stdout)
    assert (desc["format"], desc["phases"], desc["slices"], desc["matrix"]) == ("nifti", 2, 4, [40, 40])
    assert "no preview.png" in p.stderr and "deeprecon-rt[report]" in p.stderr
    assert not (tmp_path / "study" / "preview.png").exists()
    # the cli extra installed, torch and matplotlib still absent: the command itself
    code = block_modules("torch", "matplotlib", "PIL") + (
        "from deeprecon.runtime.cli import run\n"
        f"rc = run(['study', 'info', {str(tmp_path / 'study')!r}, '--json'])\n"
        "assert rc == 0, rc\n"
        "bad = [m for m in sys.modules if m.partition('.')[0] in ('torch', 'matplotlib', 'PIL')]\n"
        "assert not bad, bad\n")
    p = _py(code, cwd="/")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout) == desc


@pytest.mark.parametrize("blocked", [("typer",), ("rich",), ("typer", "rich")])
def test_console_script_without_cli_extra_says_so(blocked):
    """`deeprecon-rt` without typer or rich: one line naming the extra, exit 69, no
    traceback (the console script is runtime/console.py's main)."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["deeprecon-rt"] == "deeprecon.runtime.console:main"
    p = _py(block_modules(*blocked) + "sys.argv = ['deeprecon-rt', 'study', 'info', '.']\n"
            "from deeprecon.runtime.console import main\nmain()\n", cwd="/")
    assert p.returncode == 69, p.stderr
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("deeprecon-rt: error: the command line needs " + " and ".join(blocked))
    assert lines[0].endswith("pip install 'deeprecon-rt[cli]'")


def test_console_script_runs_the_cli():
    p = subprocess.run([sys.executable, "-m", "deeprecon.runtime.console", "--version"],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("deeprecon-rt ")


def test_reconstruct_without_torch_names_what_is_missing(tiny_bundle):
    """The torch backend asked for on a machine without torch: exit 69 naming the extra,
    and the bundle (hashes, manifest) is still checked without torch."""
    code = BLOCK_TORCH + (
        "from deeprecon.runtime.cli import run\n"
        f"rc = run(['bundle', 'info', {str(tiny_bundle)!r}, '--json'])\n"
        "assert rc == 0, rc\n"
        f"rc = run(['reconstruct', 'nowhere', '-o', 'x', '--bundle', {str(tiny_bundle)!r}])\n"
        "assert rc == 66, rc\n"
        "from deeprecon.runtime import Reconstructor\n"
        "from deeprecon.runtime.errors import UnavailableError\n"
        "try:\n"
        f"    Reconstructor({str(tiny_bundle)!r}, backend='torch')\n"
        "except UnavailableError as e:\n"
        "    print(e)\n")
    p = _py(code, cwd="/")
    assert p.returncode == 0, p.stderr
    assert "torch" in p.stdout and "deeprecon-rt[torch]" in p.stdout


@pytest.mark.slow
def test_wheel_builds_installs_and_imports(tmp_path):
    """A wheel of a copy of the tree (with a fake reference bundle), installed into a
    temporary target: the packages, the data split, the kernel and the bundle are in it."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    src = _copy_tree(tmp_path / "src")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                        "--no-deps", "-w", str(wheel_dir), str(src)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    wheels = list(wheel_dir.glob("deeprecon_rt-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    for f in ("deeprecon/runtime/study.py", "deeprecon/runtime/cli.py",
              "deeprecon/cpp_ext/__init__.py", "deeprecon/trainer/__init__.py",
              "deeprecon/export/__init__.py", "deeprecon/trainer/stages/gan.py",
              "deeprecon/trainer/splits/acdc.json",
              *(f"deeprecon/runtime/models/reference/{rel}" for rel in FAKE_BUNDLE)):
        assert f in names, f
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "deeprecon.trainer.cli:app" in zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    assert not any(n.startswith(("tests/", "benchmarks/", "deeprecon/tests")) for n in names)
    assert not any(n.endswith("setup.py") for n in names)
    # the compiled kernels travel in the wheel (torch is installed here): the torch op
    # and the torch-free library; their C++/CUDA sources do not
    assert any(n.startswith("deeprecon/cpp_ext/_C") and n.endswith((".so", ".pyd")) for n in names)
    assert any(n.startswith("deeprecon/cpp_ext/_ncc_core") and n.endswith((".so", ".pyd"))
               for n in names)
    assert "deeprecon/cpp_ext/numpy_ops.py" in names
    assert not [n for n in names if n.endswith((".cpp", ".cc", ".h", ".cu", ".cuh"))]
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(target), str(wheels[0])], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _py(f"import sys; sys.path.insert(0, {str(target)!r})\n"
            "import deeprecon.runtime.study as s, deeprecon.cpp_ext as c\n"
            "from deeprecon.trainer.split import load_split\n"
            "from deeprecon.runtime.bundle import default_bundle_path\n"
            "assert len(load_split('acdc')['train']) == 60\n"
            "print(s.__file__)\n"
            "print(default_bundle_path())", cwd="/", env={**os.environ, "DEEPRECON_BUNDLE": ""})
    assert p.returncode == 0, p.stderr
    study_file, bundle_dir = p.stdout.split()
    assert study_file.startswith(str(target))
    assert Path(bundle_dir) == (target / "deeprecon/runtime/models/reference").resolve()
    # the installed torch-free library runs with torch blocked
    p = _py(BLOCK_TORCH + f"sys.path.insert(0, {str(target)!r})\n"
            "import numpy as np\n"
            "from deeprecon.cpp_ext import numpy_ops\n"
            "x = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)\n"
            "loss, grad = numpy_ops.ncc_roi_loss_np(x, x[::-1].copy(), np.ones_like(x[:1]))\n"
            "assert np.isfinite(loss).all() and grad.shape == x.shape\n"
            "assert 'torch' not in sys.modules\n"
            "print(numpy_ops.library_path())", cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(str(target))
