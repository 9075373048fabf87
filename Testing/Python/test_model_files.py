"""nnU-Net folders, compressed-model files, the cache and the compress/info commands."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from TuckerSegLib.errors import ModelError
from TuckerSegLib.models import open_model
from TuckerSegLib.compression.cache import get_compressed_network
from TuckerSegLib.models.compressed_file import load_compressed, save_compressed
from TuckerSegLib.models.nnunet_folder import load_model_folder
from TuckerSegLib.compression.compress import compress_network
from TuckerSegLib.specs import CompressionSpec

from tiny_models import write_model_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("models") / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres")


def _x(model):
    torch.manual_seed(3)
    return torch.randn(1, model.num_input_channels, *model.patch_size)


def test_load_model_folder(model_dir):
    m = load_model_folder(model_dir)
    assert m.patch_size == (32, 32, 32)
    assert m.num_classes == 3
    assert m.label_names == {0: "background", 1: "structure_1", 2: "structure_2"}
    with torch.no_grad():
        assert m.network(_x(m)).shape == (1, 3, 32, 32, 32)


def test_a_model_folder_loads_without_its_network_and_adds_it_on_demand(model_dir):
    from TuckerSegLib.models.nnunet_folder import with_weights

    full = load_model_folder(model_dir)
    header = load_model_folder(model_dir, with_network=False)
    assert header.network is None
    assert (header.patch_size, header.num_classes, header.trainer_name, header.source_fingerprint) == \
        (full.patch_size, full.num_classes, full.trainer_name, full.source_fingerprint)
    assert with_weights(header) is header
    assert all(torch.equal(a, b) for a, b in zip(header.network.state_dict().values(),
                                                  full.network.state_dict().values()))


def test_save_load_identical_outputs(model_dir, tmp_path):
    m = load_model_folder(model_dir)
    res = compress_network(m.network, CompressionSpec(0.4, "budget"), patch_size=m.patch_size)
    out = save_compressed(tmp_path / "c", m, res)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "manifest.json", "model.safetensors", "plans.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == m.source_sha256()
    assert manifest["compression"]["policy"] == "budget" and manifest["compression"]["ratio"] == 0.4
    assert any(r is not None for r in manifest["layers"].values())
    loaded = load_compressed(out)
    x = _x(m)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), res.network(x))
    assert open_model(out).manifest["weights"]["sha256"] == manifest["weights"]["sha256"]
    # never a pickle in our own files
    assert not any(p.suffix in (".pth", ".pkl", ".pt") for p in out.iterdir())


def test_corrupted_or_mismatched_file_refused(model_dir, tmp_path):
    m = load_model_folder(model_dir)
    res = compress_network(m.network, CompressionSpec(0.4, "budget"), patch_size=m.patch_size)
    out = save_compressed(tmp_path / "c", m, res)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupt"):
        load_compressed(out)
    # a manifest whose ranks do not match the weights: refused even without the hash check
    out2 = save_compressed(tmp_path / "c2", m, res)
    manifest = json.loads((out2 / "manifest.json").read_text())
    name = next(k for k, v in manifest["layers"].items() if v)
    manifest["layers"][name] = [v + 1 if v > 1 else v for v in manifest["layers"][name]]
    (out2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="does not match"):
        load_compressed(out2, verify_hash=False)
    (out2 / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError):
        load_compressed(out2)


def test_bad_model_folders(tmp_path, model_dir):
    with pytest.raises(ModelError, match="not found"):
        load_model_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="plans.json"):
        load_model_folder(tmp_path / "empty")
    with pytest.raises(ModelError, match="fold 3"):
        load_model_folder(model_dir, fold=3)


@pytest.mark.parametrize("with_network", [True, False])  # False: the memory-mapped header load
def test_unsafe_checkpoint_refused(tmp_path, model_dir, with_network):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"network_weights": {}, "payload": Evil()}, bad / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ModelError, match="safely"):
        load_model_folder(bad, with_network=with_network)


def test_cache_builds_once_and_rebuilds_damaged(model_dir, tmp_path):
    cache = tmp_path / "cache"
    net1, man1 = get_compressed_network(model_dir, CompressionSpec(0.5, "uniform"), cache_dir=cache)
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1
    mtime = (entries[0] / "model.safetensors").stat().st_mtime_ns
    net2, man2 = get_compressed_network(model_dir, CompressionSpec(0.5, "uniform"), cache_dir=cache)
    assert (entries[0] / "model.safetensors").stat().st_mtime_ns == mtime  # loaded, not rebuilt
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net1(x), net2(x))
    (entries[0] / "model.safetensors").write_bytes(b"garbage")
    net3, _ = get_compressed_network(model_dir, CompressionSpec(0.5, "uniform"), cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(net3(x), net1(x))
    # ratio 1.0: the original network, nothing cached
    net4, man4 = get_compressed_network(model_dir, CompressionSpec(1.0, "uniform"), cache_dir=cache)
    assert man4["report"]["macs_ratio"] == 1.0
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1


def test_cache_entries_of_another_algorithm_version_are_not_reused(model_dir, tmp_path, monkeypatch):
    """A TuckerSeg that chooses ranks differently must not load what an older one cached."""
    from TuckerSegLib.compression import cache as cache_mod

    cache = tmp_path / "cache"
    get_compressed_network(model_dir, CompressionSpec(0.5, "uniform"), cache_dir=cache)
    monkeypatch.setattr(cache_mod, "ALGORITHM_VERSION", cache_mod.ALGORITHM_VERSION + 1)
    get_compressed_network(model_dir, CompressionSpec(0.5, "uniform"), cache_dir=cache)
    names = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(names) == 2 and names[0].rsplit("-v", 1)[0] == names[1].rsplit("-v", 1)[0]


def test_models_that_share_a_cache_folder_keep_their_own_entries(tmp_path):
    """``--cache-dir`` (or ``$TUCKERSEG_CACHE_DIR``) is one folder for every model, and the five
    models of ``total`` share their folder name: each keeps its own entry, none is rebuilt."""
    trainer = "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
    folders = [write_model_folder(tmp_path / f"Dataset29{i}_Part{i}" / trainer, seed=i) for i in (1, 2)]
    cache = tmp_path / "shared"
    spec = CompressionSpec(0.5, "uniform")
    first = [get_compressed_network(f, spec, cache_dir=cache)[0] for f in folders]
    entries = sorted(p for p in cache.iterdir() if p.is_dir())
    assert len(entries) == 2
    stamps = [(e / "model.safetensors").stat().st_mtime_ns for e in entries]
    again = [get_compressed_network(f, spec, cache_dir=cache)[0] for f in folders]
    assert [(e / "model.safetensors").stat().st_mtime_ns for e in entries] == stamps  # loaded, not rebuilt
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        for a, b in zip(first, again):
            assert torch.equal(a(x), b(x))
        assert not torch.equal(again[0](x), again[1](x))  # each model got its own network back


def test_cache_concurrent_builders(model_dir, tmp_path):
    cache = tmp_path / "cache"
    code = ("import sys; from TuckerSegLib.compression.cache import get_compressed_network as g;"
            "from TuckerSegLib.specs import CompressionSpec;"
            f"g(r'{model_dir}', CompressionSpec(0.3, 'budget'), cache_dir=r'{cache}')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE) for _ in range(3)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and not any(p.name.startswith(".") for p in entries)
    load_compressed(entries[0])  # intact


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "TuckerSegLib", *map(str, args), "--progress", "none"],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_cli_compress_and_info(model_dir, tmp_path):
    out = tmp_path / "compressed"
    r = _cli("compress", model_dir, "--ratio", "0.3", "--policy", "paper", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "params:" in r.stdout
    r = _cli("info", out, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["compressed"]["params"] < info["original"]["params"]
    assert info["compressed"]["macs"] < info["original"]["macs"]
    assert info["layers"] and {"name", "ranks", "params_before", "params_after", "macs_before",
                               "macs_after", "rel_error"} <= set(info["layers"][0])
    r = _cli("info", model_dir, "--json")
    orig = json.loads(r.stdout)
    assert orig["original"] == orig["compressed"] == info["original"]
    r = _cli("info", model_dir)
    assert r.returncode == 0 and "MACs per patch" in r.stdout and "encoder.stages" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--ratio", "0"], "ratio"),
    (["--ratio", "1.5"], "ratio"),
    (["--ratio", "0.5", "--policy", "uniform"], None),  # valid: control
])
def test_cli_bad_ratio(model_dir, tmp_path, args, needle):
    out = tmp_path / "o"
    r = _cli("compress", model_dir, *args, "-o", out)
    if needle is None:
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr
    assert not out.exists()


def test_cli_bad_folders(tmp_path):
    r = _cli("compress", tmp_path / "nope", "--ratio", "0.5", "-o", tmp_path / "o")
    assert r.returncode != 0 and "not found" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "notnnunet").mkdir()
    (tmp_path / "notnnunet" / "readme.txt").write_text("hi")
    r = _cli("info", tmp_path / "notnnunet")
    assert r.returncode != 0 and "not an nnU-Net model folder" in r.stderr
    assert not (tmp_path / "o").exists()


def test_the_original_cost_is_counted_once_per_architecture_and_kept(model_dir, tmp_path):
    import json

    from TuckerSegLib.network.cost import count_cost
    from TuckerSegLib.pipeline.model_loading import COSTS_FILE, original_cost

    m = load_model_folder(model_dir)
    shape = (1, m.num_input_channels, *m.patch_size)
    counted = count_cost(m.network, shape)
    assert original_cost(m.network, shape, tmp_path) == (counted.params, counted.macs)
    (key, kept), = json.loads((tmp_path / COSTS_FILE).read_text()).items()
    assert kept == [counted.params, counted.macs]
    # read back, not counted: a value planted under the key comes back as it is
    (tmp_path / COSTS_FILE).write_text(json.dumps({key: [1, 2]}))
    assert original_cost(m.network, shape, tmp_path) == (1, 2)
    # another input shape is another entry; a damaged file is counted again and rewritten
    other = (1, m.num_input_channels, 16, 16, 16)
    assert original_cost(m.network, other, tmp_path) == (counted.params, count_cost(m.network, other).macs)
    (tmp_path / COSTS_FILE).write_text("{not json")
    assert original_cost(m.network, shape, tmp_path) == (counted.params, counted.macs)
