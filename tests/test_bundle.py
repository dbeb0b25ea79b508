"""The model bundle: what export writes (files, manifest, specs, hashes), what the runtime
loads (programs that match their networks, gradients included), what it refuses (any
changed byte, a missing or unlisted file, a pickle), export from a trained chain and
the ``deeprecon-rt export`` command, and reading a bundle without torch."""
from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundles import tiny_networks  # noqa: E402
from test_packaging import BLOCK_TORCH  # noqa: E402

from deeprecon.export.bundle import (INVERSION_DEFAULTS, build_bundle,  # noqa: E402
                                     export_bundle, inversion_settings)
from deeprecon.export.onnx import ExportVerificationError  # noqa: E402
from deeprecon.runtime import bundle as rb  # noqa: E402
from deeprecon.runtime.bundle import (MANIFEST, check_program_archive,  # noqa: E402
                                      default_bundle_path, load_bundle)
from deeprecon.runtime.cli import run as cli_run  # noqa: E402
from deeprecon.runtime.errors import (BundleError, ExitCode, NoInputError,  # noqa: E402
                                      UnavailableError, UsageError)
from deeprecon.trainer.config import get_preset  # noqa: E402
from deeprecon.trainer.lpips import load_lpips  # noqa: E402

pytestmark = pytest.mark.slow

R, L, C = 32, 8, 32  # the tiny preset: grid, num_ws, w_dim
FILES = ["programs/encoder.pt2", "programs/generator.pt2", "programs/lpips.pt2",
         "programs/segmenter.pt2", "weights/encoder.safetensors",
         "weights/generator.safetensors", "weights/lpips.safetensors",
         "weights/segmenter.safetensors", "encoder.onnx", "generator.onnx", "segmenter.onnx",
         "lpips_features.onnx", "hybrid_grad.onnx"]
GRAPHS = ("encoder", "generator", "segmenter", "lpips")      # the networks, with torch programs
ALL_GRAPHS = GRAPHS + ("lpips_features", "hybrid_grad")
ARTIFACTS = {"encoder": ("torch_program", "onnx"), "generator": ("torch_program", "onnx"),
             "segmenter": ("torch_program", "onnx"), "lpips": ("torch_program",),
             "lpips_features": ("onnx",), "hybrid_grad": ("onnx",)}
IMG = ["batch", 1, R, R]
SPECS = {
    "encoder": ([{"name": "image", "dtype": "float32", "shape": IMG}],
                [{"name": "w", "dtype": "float32", "shape": ["batch", L, C]}]),
    "generator": ([{"name": "w", "dtype": "float32", "shape": ["batch", L, C]}],
                  [{"name": "image", "dtype": "float32", "shape": IMG}]),
    "segmenter": ([{"name": "image", "dtype": "float32", "shape": IMG}],
                  [{"name": "logits", "dtype": "float32", "shape": ["batch", 4, R, R]}]),
    "lpips": ([{"name": "x", "dtype": "float32", "shape": IMG},
               {"name": "y", "dtype": "float32", "shape": IMG}],
              [{"name": "distance", "dtype": "float32", "shape": ["batch"]}]),
}
# parity of a reloaded program with its network (float32, CPU; export measured 0 here)
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def nets() -> dict[str, torch.nn.Module]:
    """The networks of the tiny_bundle fixture (same seed), with the LPIPS."""
    return {**tiny_networks(seed=0), "lpips": load_lpips()}


def _inputs(graph: str, batch: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.rand(batch, 1, R, R, generator=g) * 2 - 1  # noqa: E731
    if graph == "generator":
        return (torch.randn(batch, L, C, generator=g),)
    return (img(), img()) if graph == "lpips" else (img(),)


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    err = float((got.double() - ref.double()).abs().max())
    assert err <= ATOL + RTOL * float(ref.abs().max()), err


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def _rewrite_manifest(bundle: Path, edit) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    edit(m)
    (bundle / MANIFEST).write_text(json.dumps(m, indent=2))


def _relist(bundle: Path, rel: str) -> None:
    """Update the manifest's size and hash of ``rel`` (so that only other checks fire)."""
    def edit(m):
        p = bundle / rel
        m["files"][rel] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                           "bytes": p.stat().st_size}
    _rewrite_manifest(bundle, edit)


# ----------------------------------------------------------------------------- what export writes


def test_build_bundle_writes_every_file_and_the_manifest(tiny_bundle):
    written = sorted(p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*")
                     if p.is_file())
    assert written == sorted(FILES + [MANIFEST])
    assert not [p for p in tiny_bundle.parent.iterdir() if p.name.startswith(".")], \
        "a temporary folder was left beside the bundle"
    m = json.loads((tiny_bundle / MANIFEST).read_text())
    assert list(m) == ["format", "schema_version", "name", "created", "model", "preprocess",
                       "labels", "inversion", "weights", "graphs", "files", "versions",
                       "provenance"]
    assert m["format"] == "deeprecon-bundle" and m["schema_version"] == 3
    assert m["name"] == "tiny-random-seed0"
    created = datetime.datetime.fromisoformat(m["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    tiny = get_preset("tiny")
    assert m["model"] == {"preset": "tiny", "resolution": R, "num_ws": L, "w_dim": C,
                          "config": tiny.to_dict()}
    assert m["preprocess"] == tiny.preprocess.to_dict()
    assert m["labels"] == {"0": "background", "1": "LV cavity", "2": "LV myocardium",
                           "3": "RV cavity"}
    assert m["inversion"] == INVERSION_DEFAULTS == {
        "steps": 100, "lr": 0.01, "lambda1": 1.0, "lambda2": 0.5, "lambda3": 0.1,
        "ncc_window": 9, "early_stop_patience": 10, "early_stop_rel_tol": 1e-3,
        "roi_dilation_mm": 10.0, "batch": 64}
    assert m["weights"] == {g: f"weights/{g}.safetensors" for g in GRAPHS}
    assert list(m["graphs"]) == list(ALL_GRAPHS)
    for g, (inputs, outputs) in SPECS.items():
        entry = m["graphs"][g]
        assert (entry["inputs"], entry["outputs"], entry["weights"]) == (inputs, outputs, [g])
    assert m["graphs"]["hybrid_grad"]["weights"] == ["generator", "encoder", "lpips"]
    feats = m["graphs"]["lpips_features"]["outputs"]
    assert [t["name"] for t in feats] == ["fx0", "fx1", "fx2", "fx3", "fx4"]  # tiny: all five
    assert [t["name"] for t in m["graphs"]["hybrid_grad"]["inputs"]] == \
        ["w", "x", "roi", "fx0", "fx1", "fx2", "fx3", "fx4", "lambdas", "ncc_window"]
    assert m["graphs"]["hybrid_grad"]["inputs"][-1] == {"name": "ncc_window", "dtype": "int64",
                                                        "shape": [1]}
    for g, kinds in ARTIFACTS.items():
        entry = m["graphs"][g]
        assert entry["batch"]["min"] == 1 and entry["batch"]["max"] >= entry["batch"]["opt"]
        assert tuple(entry["artifacts"]) == kinds
        for kind, a in entry["artifacts"].items():
            assert a["file"] == (f"programs/{g}.pt2" if kind == "torch_program" else f"{g}.onnx")
            # the errors measured at export against PyTorch (hybrid_grad: autograd of the
            # runtime's hybrid_loss, with the fused op)
            assert a["check"]["max_rel_err"] < 1e-4 and a["check"]["batch"] == 3, (g, kind)
            assert a["check"]["reference"] == ("autograd of hybrid_loss" if g == "hybrid_grad"
                                               else "module")
            if kind == "onnx":
                assert a["opset"] >= 18
                assert a["check"]["weights_linked_bytes"] > 0
    check = m["graphs"]["hybrid_grad"]["artifacts"]["onnx"]["check"]
    assert check["inline_bytes"] < 0.1 * check["weights_linked_bytes"]  # weights stored once
    assert sorted(m["files"]) == sorted(FILES)
    for rel, entry in m["files"].items():
        data = (tiny_bundle / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert set(m["versions"]) == {"deeprecon", "torch", "python", "onnx", "onnxruntime"}
    assert m["versions"]["torch"] == torch.__version__
    assert m["provenance"] == {"runs": {}, "command": "tests/bundles.py make_tiny_bundle"}


def test_the_same_networks_give_the_same_bytes(tiny_bundle, tmp_path):
    """Export is reproducible: a second export of the same networks writes every file
    byte for byte again (the safetensors metadata in sorted order, no per-node stack
    traces in the graphs), so a re-exported bundle changes only what changed."""
    from bundles import make_tiny_bundle

    again = make_tiny_bundle(tmp_path / "again")
    for rel in FILES:
        assert (again / rel).read_bytes() == (tiny_bundle / rel).read_bytes(), rel
    assert (json.loads((again / MANIFEST).read_text())["files"]
            == json.loads((tiny_bundle / MANIFEST).read_text())["files"])


def test_graphs_carry_no_source_locations(tiny_bundle):
    import onnx

    for rel in FILES:
        if rel.endswith(".onnx"):
            model = onnx.load(str(tiny_bundle / rel), load_external_data=False)
            assert model.graph.node and not any(n.metadata_props for n in model.graph.node), rel
            raw = (tiny_bundle / rel).read_bytes()
            assert b"stack_trace" not in raw, rel
            assert str(Path(__file__).resolve().parents[1]).encode() not in raw, rel


def test_weights_are_float32_state_dicts(tiny_bundle, nets):
    for g in GRAPHS:
        w = load_file(str(tiny_bundle / f"weights/{g}.safetensors"))
        sd = nets[g].state_dict()
        assert set(w) == set(sd) | ({"w_avg"} if g == "generator" else set())
        for key, ref in sd.items():
            assert w[key].dtype == torch.float32 and torch.equal(w[key], ref.float()), (g, key)
    w = load_file(str(tiny_bundle / "weights/generator.safetensors"))
    assert w["w_avg"].shape == (C,) and w["w_avg"].abs().sum() > 0
    assert torch.equal(w["w_avg"], w["mapping.w_avg"])


def test_programs_hold_no_pickles(tiny_bundle):
    for g in GRAPHS:
        with zipfile.ZipFile(tiny_bundle / f"programs/{g}.pt2") as zf:
            sample = [i for i in zf.infolist() if "/data/sample_inputs/" in i.filename]
            assert sample and all(i.file_size == 0 for i in sample)
            configs = [n for n in zf.namelist() if n.endswith("_config.json")]
            assert len(configs) == 2
            for name in configs:
                entries = json.loads(zf.read(name))["config"].values()
                assert all(e["use_pickle"] is False for e in entries)
        check_program_archive(tiny_bundle / f"programs/{g}.pt2")


# ----------------------------------------------------------------------------- what the runtime loads


def test_load_bundle_round_trip(tiny_bundle):
    b = load_bundle(tiny_bundle)
    raw = (tiny_bundle / MANIFEST).read_bytes()
    assert b.sha256 == hashlib.sha256(raw).hexdigest() and b.manifest == json.loads(raw)
    assert (b.name, b.preset, b.resolution, b.num_ws, b.w_dim) == ("tiny-random-seed0", "tiny", R, L, C)
    assert b.preprocess == get_preset("tiny").preprocess
    assert b.labels == {0: "background", 1: "LV cavity", 2: "LV myocardium", 3: "RV cavity"}
    assert b.inversion == INVERSION_DEFAULTS
    assert list(b.graphs) == list(ALL_GRAPHS)
    for g, (inputs, outputs) in SPECS.items():
        spec = b.graphs[g]
        assert spec.name == g
        assert [t.to_dict() for t in spec.inputs] == inputs
        assert [t.to_dict() for t in spec.outputs] == outputs
        assert b.file(spec.files["torch_program"]) == tiny_bundle / f"programs/{g}.pt2"
    with pytest.raises(BundleError):
        b.file("manifest.json")
    with pytest.raises(UsageError, match="no graph 'wseg'"):
        b.load_program("wseg")
    d = b.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["sha256"] == b.sha256 and d["files"] == {k: v["bytes"] for k, v in b.files.items()}
    assert d["graphs"]["lpips"]["inputs"] == ["x float32[batch, 1, 32, 32]",
                                             "y float32[batch, 1, 32, 32]"]
    assert load_bundle(tiny_bundle, verify=False).sha256 == b.sha256


@pytest.mark.parametrize("graph", GRAPHS)
def test_program_matches_its_network(tiny_bundle, nets, graph):
    b = load_bundle(tiny_bundle)
    program = b.load_program(graph)
    assert not any(p.requires_grad for p in program.module.parameters())
    assert not list(program.module.parameters())  # the weights come from weights/, once
    for batch in (1, 5):  # neither is the traced example batch (2)
        x = _inputs(graph, batch)
        b.graph(graph).check_feeds({t.name: v for t, v in zip(b.graph(graph).inputs, x)})
        with torch.no_grad():
            got, ref = program(*x), nets[graph](*x)
        assert got.shape == ref.shape
        _close(got, ref)
    w = b.load_weights(graph)
    sd = nets[graph].state_dict()
    assert all(isinstance(v, np.ndarray) for v in w.values())
    assert all(np.array_equal(w[k], v.float().numpy()) for k, v in sd.items())


@pytest.mark.parametrize("graph,arg", [("generator", 0), ("lpips", 0), ("encoder", 0)])
def test_program_gradient_matches_autograd(tiny_bundle, nets, graph, arg):
    """Inversion differentiates through G and LPIPS: the program's input gradient is the
    network's."""
    program = load_bundle(tiny_bundle).load_program(graph)
    grads = []
    for f in (program, nets[graph]):
        x = [t.clone().requires_grad_(i == arg) for i, t in enumerate(_inputs(graph, 3, seed=4))]
        out = f(*x)
        weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        (out * weight).sum().backward()
        grads.append(x[arg].grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    _close(grads[0], grads[1])


def test_check_feeds_names_what_is_wrong(tiny_bundle):
    b = load_bundle(tiny_bundle, verify=False)
    img = np.zeros((2, 1, R, R), np.float32)
    b.graph("lpips").check_feeds({"x": img, "y": torch.zeros(2, 1, R, R)})
    cases = [
        ("encoder", {"img": img}, r"graph 'encoder': expected the inputs \['image'\]"),
        ("encoder", {"image": img.astype(np.float64)}, "expected dtype float32, got float64"),
        ("encoder", {"image": torch.zeros(2, 1, R, R, dtype=torch.float16)},
         "expected dtype float32, got float16"),
        ("encoder", {"image": img[0]}, r"expected shape \[batch, 1, 32, 32\] \(4 dimensions\)"),
        ("segmenter", {"image": np.zeros((2, 1, 16, 16), np.float32)},
         r"input 'image': expected shape \[batch, 1, 32, 32\], got \[2, 1, 16, 16\]"),
        ("lpips", {"x": img, "y": img[:1]}, "dimension 'batch' is 1 in input 'y' but 2"),
        ("generator", {"w": np.zeros((0, L, C), np.float32)}, "must be >= 1"),
    ]
    for graph, feeds, message in cases:
        with pytest.raises(UsageError, match=message):
            b.graph(graph).check_feeds(feeds)


# ----------------------------------------------------------------------------- what it refuses


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", FILES)
def test_one_changed_byte_in_any_file_is_refused(tiny_bundle, tmp_path, rel):
    b = _copy(tiny_bundle, tmp_path)
    size = (b / rel).stat().st_size
    for offset in (size // 2, size - 1):  # in the data, at the end (zip directory / tensor)
        _flip(b / rel, offset)
        with pytest.raises(BundleError, match=f"{rel} changed since export") as e:
            load_bundle(b)
        assert e.value.exit_code == ExitCode.BAD_BUNDLE == 78
        _flip(b / rel, offset)
    load_bundle(b)  # restored


def _flip_hash(m):
    h = m["files"]["weights/segmenter.safetensors"]["sha256"]
    m["files"]["weights/segmenter.safetensors"]["sha256"] = ("0" if h[0] != "0" else "1") + h[1:]


MANIFEST_EDITS = {
    "hash value": (lambda b: _rewrite_manifest(b, _flip_hash),
                   "weights/segmenter.safetensors changed since export"),
    "size": (lambda b: _rewrite_manifest(
        b, lambda m: m["files"]["programs/lpips.pt2"].update(bytes=1)),
        "programs/lpips.pt2 changed since export"),
    "broken json": (lambda b: _flip(b / MANIFEST, 0), "not valid JSON"),
    "truncated": (lambda b: (b / MANIFEST).write_bytes((b / MANIFEST).read_bytes()[:-30]),
                  "not valid JSON"),
    "newer schema": (lambda b: _rewrite_manifest(b, lambda m: m.update(schema_version=4)),
                     "schema version 4 is newer"),
    "schema 1": (lambda b: _rewrite_manifest(b, lambda m: m.update(schema_version=1)),
                 "a schema-1 bundle; this deeprecon-rt reads schema 3"),
    "schema 2": (lambda b: _rewrite_manifest(b, lambda m: m.update(schema_version=2)),
                 "a schema-2 bundle; this deeprecon-rt reads schema 3"),
    "unknown artifact": (lambda b: _rewrite_manifest(
        b, lambda m: m["graphs"]["encoder"]["artifacts"].update(plan={"file": "encoder.onnx"})),
        "unknown artifact kind"),
    "batch range": (lambda b: _rewrite_manifest(
        b, lambda m: m["graphs"]["encoder"]["batch"].update(min=0)), "bad batch range"),
    "one gradient graph": (lambda b: _rewrite_manifest(
        b, lambda m: m["graphs"].pop("hybrid_grad")), "come together"),
    "other format": (lambda b: _rewrite_manifest(b, lambda m: m.update(format="x")),
                     "not a deeprecon-bundle manifest"),
    "missing key": (lambda b: _rewrite_manifest(b, lambda m: m.pop("inversion")),
                    r"missing keys \['inversion'\]"),
    "spec": (lambda b: _rewrite_manifest(
        b, lambda m: m["graphs"]["generator"]["inputs"][0]["shape"].__setitem__(1, 9)),
        "do not match the model"),
    "unlisted graph file": (lambda b: _rewrite_manifest(
        b, lambda m: m["files"].pop("weights/lpips.safetensors")),
        "not in the manifest's files"),
    "path outside": (lambda b: _rewrite_manifest(
        b, lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "bytes": 0}})),
        "leaves the bundle"),
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_a_changed_manifest_is_refused(tiny_bundle, tmp_path, edit):
    b = _copy(tiny_bundle, tmp_path)
    change, message = MANIFEST_EDITS[edit]
    change(b)
    with pytest.raises(BundleError, match=message):
        load_bundle(b)


def test_missing_and_unlisted_files_are_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    (b / "programs/generator.pt2").rename(tmp_path / "g.pt2")
    with pytest.raises(BundleError, match="programs/generator.pt2 is missing"):
        load_bundle(b)
    (tmp_path / "g.pt2").rename(b / "programs/generator.pt2")
    for extra in ("notes.txt", "programs/.hidden", "weights/extra/unet.safetensors"):
        (b / extra).parent.mkdir(parents=True, exist_ok=True)
        (b / extra).write_bytes(b"x")
        with pytest.raises(BundleError, match=f"does not list: {extra}"):
            load_bundle(b)
        (b / extra).unlink()
    load_bundle(b)
    with pytest.raises(NoInputError):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(b / MANIFEST)
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(tmp_path)


def test_a_pickled_program_member_is_refused(tiny_bundle, tmp_path):
    """A program saved with its example inputs kept (torch.export.save pickles them)."""
    b = _copy(tiny_bundle, tmp_path)
    rel = "programs/segmenter.pt2"
    ep = torch.export.load(str(b / rel))
    ep._example_inputs = ((torch.zeros(2, 1, R, R),), {})
    torch.export.save(ep, str(b / rel))
    with zipfile.ZipFile(b / rel) as zf:
        assert any("sample_inputs" in i.filename and i.file_size for i in zf.infolist())
    _relist(b, rel)  # hashes right: only the pickle check can refuse it
    with pytest.raises(BundleError, match="pickled example inputs"):
        load_bundle(b)
    with pytest.raises(BundleError, match="pickled example inputs"):
        load_bundle(b, verify=False).load_program("segmenter")


def test_a_pickled_weight_entry_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    rel = "programs/generator.pt2"
    src = zipfile.ZipFile(tiny_bundle / rel)
    with zipfile.ZipFile(b / rel, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                assert config["config"] == {}  # the weights are inputs: none inside
                config["config"]["w"] = {"path_name": "weight_0", "use_pickle": True}
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    src.close()
    _relist(b, rel)
    with pytest.raises(BundleError, match="use_pickle: True"):
        load_bundle(b)


def test_build_bundle_refuses_existing_output_and_cleans_up_after_a_failure(tmp_path, nets):
    model = get_preset("tiny")
    kw = dict(model=model, **nets)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("not a bundle")
    with pytest.raises(UsageError, match="already exists"):
        build_bundle(tmp_path / "taken", **kw)
    with pytest.raises(UsageError, match="not a model bundle"):
        build_bundle(tmp_path / "taken", overwrite=True, **kw)
    with pytest.raises(UsageError, match="unknown inversion setting 'step'"):
        build_bundle(tmp_path / "new", inversion={"step": 3}, **kw)

    class Noisy(torch.nn.Module):  # a program that cannot reproduce its network
        def forward(self, img):
            return torch.randn(img.shape[0], L, C)

    with pytest.raises(ExportVerificationError, match="encoder: the exported artifact disagrees"):
        build_bundle(tmp_path / "new", **{**kw, "encoder": Noisy()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_inversion_settings_parse_and_check():
    s = inversion_settings({"steps": "50", "lr": "0.02", "ncc_window": 7.0})
    assert s["steps"] == 50 and s["lr"] == 0.02 and s["ncc_window"] == 7
    assert isinstance(s["ncc_window"], int)
    for bad, message in (({"steps": "ten"}, "expected an integer"),
                         ({"ncc_window": 8}, "ncc_window must be odd"),
                         ({"lr": 0}, "lr must be > 0"), ({"lambda2": -1}, "lambda2"),
                         ({"batch": 1.5}, "expected an integer")):
        with pytest.raises(UsageError, match=message):
            inversion_settings(bad)


def test_default_bundle_path(monkeypatch):
    monkeypatch.delenv("DEEPRECON_BUNDLE", raising=False)   # the shipped one, not a site's
    shipped = Path(rb.__file__).parent / "models" / "reference"
    assert rb.SHIPPED_BUNDLE == shipped.resolve()
    if (shipped / MANIFEST).is_file():
        assert default_bundle_path() == shipped.resolve()
        load_bundle(default_bundle_path())
    else:
        with pytest.raises(UnavailableError, match="no reference bundle ships") as e:
            default_bundle_path()
        assert e.value.exit_code == 69 and "--bundle" in e.value.hint


# ----------------------------------------------------------------------------- without torch

def test_bundle_reads_without_torch(tiny_bundle):
    code = BLOCK_TORCH + f"""
import json
import numpy as np
from deeprecon.runtime.bundle import load_bundle
from deeprecon.runtime.errors import UnavailableError
b = load_bundle({str(tiny_bundle)!r})
info = b.describe()
json.dumps(info)
w = b.load_weights("generator")
assert w["w_avg"].shape == ({C},) and w["w_avg"].dtype == np.float32
b.graph("encoder").check_feeds({{"image": np.zeros((3, 1, {R}, {R}), np.float32)}})
try:
    b.load_program("encoder")
except UnavailableError as e:
    assert e.exit_code == 69 and "torch" in str(e), str(e)
else:
    raise AssertionError("load_program worked without torch")
bad = [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "deeprecon.trainer",
                                                               "deeprecon.export"))]
assert not bad, bad
print(info["sha256"])
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == load_bundle(tiny_bundle, verify=False).sha256


# ----------------------------------------------------------------------------- from training runs


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """gan -> encoder -> latents -> seg with the tiny preset, one step each, on two small
    phantoms (a few seconds)."""
    from deeprecon.runtime.phantom import make_phantom, write_phantom
    from deeprecon.trainer.cli import train

    root = tmp_path_factory.mktemp("chain")
    for seed in (0, 1):
        write_phantom(make_phantom(slices=4, phases=1, seed=seed, anatomy_jitter=0.1,
                                   matrix=(64, 64), pixel_spacing_mm=4.0),
                      root / "phantoms" / f"p{seed}")
    r = {n: root / n for n in ("gan", "encoder", "latents", "seg")}
    for stage, inputs, data in (("gan", {}, True), ("encoder", {"gan": r["gan"]}, True),
                                ("latents", {"gan": r["gan"], "encoder": r["encoder"]}, True),
                                ("seg", {"latents": r["latents"]}, False)):
        train(stage, data=root / "phantoms" if data else None, preset="tiny", out=r[stage],
              inputs=inputs, steps=1)
    return r


def test_export_command_writes_a_bundle_of_the_chain(chain, tiny_bundle, tmp_path, capsys):
    """(--no-onnx: the ONNX graphs are three quarters of an export's time; writing them is
    the tiny_bundle fixture's test, test_build_bundle_writes_every_file_and_the_manifest.)"""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)  # an existing bundle, replaced with --overwrite
    (out / "stray.txt").write_text("old")
    describe = tmp_path.parent / f"{tmp_path.name}-describe.json"
    describe.write_text(json.dumps({"licence": "CC BY-NC-SA 4.0 (the training data's)",
                                    "validation": {"dice_lvc": 0.5}}))
    assert cli_run(["export", str(chain["seg"]), "-o", str(out), "--overwrite", "--json",
                    "--name", "tiny-chain", "--set", "steps=7", "--set", "lr=0.05",
                    "--describe", str(describe), "--no-onnx"]) == 0
    info = json.loads(capsys.readouterr().out)
    b = load_bundle(out)
    assert info["sha256"] == b.sha256 and info["bundle"] == str(out)
    assert not (out / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"], "temporary folders left"
    assert b.name == "tiny-chain" and b.preset == "tiny"
    assert b.inversion == {**INVERSION_DEFAULTS, "steps": 7, "lr": 0.05}
    prov = b.manifest["provenance"]
    stages = ("gan", "encoder", "latents", "seg")
    assert prov["runs"] == {k: str(chain[k].resolve()) for k in stages}
    assert prov["command"] == (f"deeprecon-rt export {chain['seg']} -o {out} --name tiny-chain "
                               f"--describe {describe} --set steps=7 --set lr=0.05 --overwrite --no-onnx")
    assert prov["licence"] == "CC BY-NC-SA 4.0 (the training data's)"
    assert prov["validation"] == {"dice_lvc": 0.5}
    # every run of the chain: its settings, data and the fingerprint of its slices
    assert set(prov["training"]) == set(stages)
    for k in stages:
        rec = prov["training"][k]
        summary = json.loads((chain[k] / "summary.json").read_text())
        assert rec["stage"] == k and rec["summary"] == summary
        assert rec["config"] == json.loads((chain[k] / "run.json").read_text())["config"]
    assert len(prov["training"]["gan"]["summary"]["data_sha256"]) == 64
    assert prov["training"]["gan"]["summary"]["data_sha256"] == \
        prov["training"]["latents"]["summary"]["data_sha256"]
    describe.write_text(json.dumps({"runs": {}}))
    assert cli_run(["export", str(chain["seg"]), "-o", str(tmp_path / "b2"),
                    "--describe", str(describe)]) == ExitCode.USAGE
    # validation figures of another K than the bundle's default: refused before any work
    describe.write_text(json.dumps({"validation": {"steps": 100, "dice": {"LVC": 0.9}}}))
    capsys.readouterr()
    assert cli_run(["export", str(chain["seg"]), "-o", str(tmp_path / "b2"), "--set", "steps=20",
                    "--describe", str(describe)]) == ExitCode.USAGE
    assert "of K = 100 inversion steps, but this bundle would run K = 20" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()
    describe.write_text("[1, 2]")
    assert cli_run(["export", str(chain["seg"]), "-o", str(tmp_path / "b2"),
                    "--describe", str(describe)]) == ExitCode.USAGE
    describe.unlink()
    # the networks are the runs': G is the gan run's (EMA) generator, E and Seg likewise
    for graph, run, prefix in (("generator", "gan", "G."), ("encoder", "encoder", "E."),
                               ("segmenter", "seg", "Seg.")):
        model = load_file(str(chain[run] / "model.safetensors"))
        w = b.load_weights(graph)
        for key, t in model.items():
            assert key.startswith(prefix)
            np.testing.assert_array_equal(w[key[len(prefix):]], t.float().numpy())
    x = _inputs("generator", 2)[0]
    with torch.no_grad():
        img = b.load_program("generator")(x)
    assert img.shape == (2, 1, R, R) and torch.isfinite(img).all()


def test_export_command_prints_the_bundle_and_its_hash(tiny_bundle, tmp_path, capsys,
                                                      monkeypatch):
    """The command's text output (the export itself is the test above's)."""
    import deeprecon.export.bundle as eb

    calls = []

    def fake_export(run_dir, out, **kw):
        calls.append((run_dir, out, kw))
        return tiny_bundle

    monkeypatch.setattr(eb, "export_bundle", fake_export)
    assert cli_run(["export", str(tmp_path), "-o", str(tmp_path / "b"), "--gan", "g",
                    "--encoder", "e", "--lpips-weights", "w.pth", "--set", "batch=8"]) == 0
    out = capsys.readouterr().out
    sha = load_bundle(tiny_bundle, verify=False).sha256
    assert f"written to {tiny_bundle}" in out and f"manifest sha256: {sha}" in out
    (run_dir, dest, kw), = calls
    assert (run_dir, dest) == (tmp_path, tmp_path / "b")
    assert kw["gan_run"] == Path("g") and kw["encoder_run"] == Path("e")
    assert kw["lpips_weights"] == Path("w.pth") and kw["inversion"] == {"batch": "8"}
    assert kw["command"].endswith("--encoder e --gan g --lpips-weights w.pth --set batch=8")


def test_export_command_exit_codes(chain, tmp_path):
    out = tmp_path / "b"
    assert cli_run(["export", str(tmp_path), "-o", str(out)]) == ExitCode.USAGE  # not a run
    assert cli_run(["export", str(tmp_path / "nope"), "-o", str(out)]) == ExitCode.NO_INPUT
    assert cli_run(["export", str(chain["gan"]), "-o", str(out)]) == ExitCode.USAGE  # not seg
    assert cli_run(["export", str(chain["seg"]), "-o", str(out),
                    "--set", "nope=1"]) == ExitCode.USAGE
    assert cli_run(["export", str(chain["seg"]), "-o", str(out), "--set", "steps"]) == 2
    out.mkdir()
    (out / MANIFEST).write_text("{}")
    assert cli_run(["export", str(chain["seg"]), "-o", str(out)]) == ExitCode.USAGE  # exists
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_export_bundle_checks_the_chain(chain, tmp_path):
    out = tmp_path / "b"
    with pytest.raises(UsageError, match="is a 'latents' run; export needs a finished 'seg'"):
        export_bundle(chain["latents"], out)
    # an encoder trained with another preset
    other = tmp_path / "encoder-small"
    shutil.copytree(chain["encoder"], other)
    info = json.loads((other / "run.json").read_text())
    info["model"] = get_preset("small128").to_dict()
    (other / "run.json").write_text(json.dumps(info))
    with pytest.raises(UsageError, match="preset 'small128'"):
        export_bundle(chain["seg"], out, encoder_run=other)
    # a run given in the wrong role
    with pytest.raises(UsageError, match="is a 'gan' run, a 'encoder' run is needed"):
        export_bundle(chain["seg"], out, encoder_run=chain["gan"])
    # a seg run whose latents run has moved: the generator and encoder must be given
    moved = tmp_path / "seg-moved"
    shutil.copytree(chain["seg"], moved)
    info = json.loads((moved / "run.json").read_text())
    info["inputs"]["latents"] = str(tmp_path / "gone")
    (moved / "run.json").write_text(json.dumps(info))
    with pytest.raises(UsageError, match="does not exist") as e:
        export_bundle(moved, out)
    assert "--gan RUN and --encoder RUN" in e.value.hint
    # a seg run without its model file
    (moved / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="has no model.safetensors"):
        export_bundle(moved, out, gan_run=chain["gan"], encoder_run=chain["encoder"])
    assert not out.exists()
