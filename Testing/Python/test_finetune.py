"""Calibration (data-aware factors), distillation, resume and the finetune command, on small real
nnU-Net models and synthetic CT-like volumes written as NIfTI (the real CT where it helps)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import write_model_folder  # noqa: E402

from TuckerSegLib.cli.main import main  # noqa: E402
from TuckerSegLib.compression.compress import compress_network  # noqa: E402
from TuckerSegLib.errors import InputError  # noqa: E402
from TuckerSegLib.compression.calibration import calibrate  # noqa: E402
from TuckerSegLib.finetune.distill import DistillConfig, distill, list_checkpoints, planned_steps  # noqa: E402
from TuckerSegLib.compression.ct_patches import PatchSampler, preprocess  # noqa: E402
from TuckerSegLib.models.compressed_file import load_compressed  # noqa: E402
from TuckerSegLib.models.nnunet_folder import load_model_folder  # noqa: E402
from TuckerSegLib.network.surgery import factorised_layers, find_sites  # noqa: E402
from TuckerSegLib.progress import Progress  # noqa: E402
from TuckerSegLib.specs import CompressionSpec
from TuckerSegLib.compression.probe_data import CompressionData

PATCH = (32, 32, 32)


def synthetic_ct(seed: int, shape=(44, 40, 36)):
    """A CT-like volume in HU (air, body, fat, organs, bone) with its label map."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    img = np.full(shape, -1000.0)
    lab = np.zeros(shape, np.uint8)
    body = (grid[0] / 0.9) ** 2 + (grid[1] / 0.75) ** 2 < 1
    img[body] = -90.0
    for label, hu in ((1, 60.0), (2, 220.0), (3, 700.0)):
        c = rng.uniform(-0.4, 0.4, 3)
        r = rng.uniform(0.18, 0.35, 3)
        m = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) < 1
        img[m & body] = hu
        lab[m & body] = label
    img += rng.normal(0, 15, shape)
    return img.astype(np.float32), lab


def write_nifti(array, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([3.0, 3.0, 3.0, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_data")
    cts = []
    for seed in range(3):
        img, lab = synthetic_ct(seed)
        cts.append(write_nifti(img, root / f"ct{seed}.nii.gz"))
        write_nifti(lab, root / f"lab{seed}.nii.gz")
    return root, cts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    folder = write_model_folder(tmp_path_factory.mktemp("tiny") / "model", features=(8, 16, 32, 32),
                                patch=PATCH, n_classes=4, seed=3)
    return load_model_folder(folder)


def _instance_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.instance_norm(t)


def test_calibrated_factors_lower_output_error_than_hosvd(tiny, data):
    _, cts = data
    stats = calibrate(tiny, cts[:2], patches_per_ct=3, seed=0)
    assert stats.describe()["instance_norm_aware"] > 0
    held_out = PatchSampler(preprocess(tiny, cts[2:]), PATCH).fixed_patches(3, seed=5)
    plain = compress_network(tiny.network, CompressionSpec(0.4, "uniform", rank_min=1), patch_size=PATCH)
    aware = compress_network(tiny.network, CompressionSpec(0.4, "uniform", rank_min=1), patch_size=PATCH, data=CompressionData(calibration=stats))
    assert plain.layer_ranks == aware.layer_ranks  # equal ranks: only the factors differ
    assert aware.report["calibration"]["method"] == "whitened-svd"

    # per layer, on the layer's real inputs, error measured after the InstanceNorm that follows
    inputs = {}
    sites = {s.name: s.module for s in find_sites(tiny.network)}
    hooks = [sites[n].register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i[0]))
             for n in factorised_layers(aware.network)]
    with torch.no_grad():
        reference = tiny.network(held_out)
    for h in hooks:
        h.remove()
    better, total_plain, total_aware = 0, 0.0, 0.0
    with torch.no_grad():
        for name, layer in factorised_layers(aware.network).items():
            x = inputs[name]
            ref = sites[name](x)
            norm = (lambda t: t) if isinstance(sites[name], nn.ConvTranspose3d) else _instance_norm
            e_plain = float(((norm(factorised_layers(plain.network)[name](x)) - norm(ref)) ** 2).mean()
                            / (norm(ref) ** 2).mean())
            e_aware = float(((norm(layer(x)) - norm(ref)) ** 2).mean() / (norm(ref) ** 2).mean())
            better += e_aware < e_plain
            total_plain += e_plain
            total_aware += e_aware
        n_layers = len(factorised_layers(aware.network))
        assert better >= 0.75 * n_layers, (better, n_layers)
        assert total_aware < 0.8 * total_plain
        # and the whole network's logits are closer too
        err = lambda net: float(((net(held_out) - reference) ** 2).mean())  # noqa: E731
        assert err(aware.network) < err(plain.network)


@pytest.mark.parametrize("bad", ["missing", "nan", "4d", "corrupt", "blank"])
def test_calibration_with_bad_ct_gives_one_line_error(tiny, data, tmp_path, bad, capsys):
    _, cts = data
    path = tmp_path / f"{bad}.nii.gz"
    if bad == "nan":
        img, _ = synthetic_ct(0)
        img[3, 3, 3] = np.nan
        write_nifti(img, path)
    elif bad == "4d":
        write_nifti(np.zeros((8, 8, 8, 2), np.float32) + np.arange(2, dtype=np.float32), path)
    elif bad == "corrupt":
        path.write_bytes(b"\x1f\x8b this is not a gzip stream")
    elif bad == "blank":
        write_nifti(np.full((20, 20, 20), -1000.0, np.float32), path)
    with pytest.raises(InputError) as info:
        calibrate(tiny, [cts[0], path])
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    expected = {"missing": "not found", "nan": "NaN", "4d": "4D image", "corrupt": "not a readable NIfTI",
                "blank": "every voxel has the value"}[bad]
    assert expected in message
    # the command line: one line on stderr, exit code 2, no output folder
    out = tmp_path / "out"
    code = main(["compress", str(tiny.folder), "--ratio", "0.5", "--calibrate", str(path), "-o", str(out),
                 "--progress", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err
    assert not out.exists()


def _setup_distill(tiny, data, ratio=0.3):
    _, cts = data
    cases = preprocess(tiny, cts[:2])
    held_out = PatchSampler(preprocess(tiny, cts[2:]), PATCH).fixed_patches(4, seed=11)
    student = compress_network(tiny.network, CompressionSpec(ratio, "uniform", rank_min=1), patch_size=PATCH).network
    return cases, held_out, student


def test_short_distillation_lowers_loss_and_raises_agreement(tiny, data, tmp_path):
    cases, held_out, student = _setup_distill(tiny, data)
    config = DistillConfig(steps=40, lr=2e-3, batch_size=2, checkpoint_every=100, recipe="classic",
                           keep_best=False)  # the last step's student is measured, not the best one
    res = distill(tiny.network, student, PatchSampler(cases, PATCH, seed=0), config, tmp_path / "work",
                  val_patches=held_out)
    first, last = np.mean(res.loss_curve[:5]), np.mean(res.loss_curve[-5:])
    assert last < 0.8 * first, (first, last)
    before, after = res.agreement_before, res.agreement_after
    assert after["voxel_agreement"] > before["voxel_agreement"], (before, after)
    assert after["mean_dice"] > before["mean_dice"], (before, after)
    assert [p.name for p in list_checkpoints(tmp_path / "work")] == ["step_000040"]


class _StopAt(Progress):
    """Cancels a run after a given step, like a user pressing Ctrl-C."""

    def __init__(self, step: int, total: int):
        self.step, self.total = step, total

    def update(self, fraction, message="", stage=""):
        if round(fraction * self.total) >= self.step:
            raise KeyboardInterrupt


def test_resume_continues_from_last_checkpoint(tiny, data, tmp_path):
    cases, _, student = _setup_distill(tiny, data, ratio=0.5)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    config = DistillConfig(steps=6, lr=1e-3, batch_size=1, checkpoint_every=2, recipe="classic")

    def fresh_student():
        s = _setup_distill(tiny, data, ratio=0.5)[2]
        s.load_state_dict(initial)
        return s

    full = distill(tiny.network, fresh_student(), PatchSampler(cases, PATCH, seed=4), config, tmp_path / "a")

    interrupted = fresh_student()
    with pytest.raises(KeyboardInterrupt):
        distill(tiny.network, interrupted, PatchSampler(cases, PATCH, seed=4), config, tmp_path / "b",
                progress=_StopAt(5, config.steps))
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_000002", "step_000004"]

    resumed_student = fresh_student()  # fresh weights: everything must come from the checkpoint
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "b" / "step_000004" / "student.safetensors"))
    resumed = distill(tiny.network, resumed_student, PatchSampler(cases, PATCH, seed=999), config,
                      tmp_path / "b", resume=True, progress=_CheckFirstWeights(resumed_student, saved))
    assert resumed.resumed_from == 4 and len(resumed.loss_curve) == 6
    assert resumed.loss_curve[:4] == full.loss_curve[:4]
    np.testing.assert_allclose(resumed.loss_curve[4:], full.loss_curve[4:], rtol=1e-5)
    for (k, a), b in zip(full.network.state_dict().items(), resumed.network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


class _CheckFirstWeights(Progress):
    """On the first log (the resume notice), the student must hold the checkpoint's weights."""

    def __init__(self, student, saved):
        self.student, self.saved, self.checked = student, saved, False

    def log(self, message):
        state = self.student.state_dict()
        for k, v in self.saved.items():
            torch.testing.assert_close(state[k].cpu(), v, msg=k)
        self.checked = True


def test_resume_without_checkpoint_is_a_clear_error(tiny, data, tmp_path):
    cases, _, student = _setup_distill(tiny, data)
    with pytest.raises(InputError, match="no checkpoint"):
        distill(tiny.network, student, PatchSampler(cases, PATCH), DistillConfig(steps=2), tmp_path / "none",
                resume=True)


def test_finetune_command_writes_a_loadable_compressed_model(tiny, data, tmp_path, capsys):
    root, cts = data
    out = tmp_path / "distilled"
    code = main(["finetune", str(tiny.folder), "-i", str(cts[0]), str(cts[1]), "--ratio", "0.5",
                 "--policy", "uniform", "--steps", "3", "--checkpoint-every", "2", "--val", str(cts[2]),
                 "-o", str(out), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    model = load_compressed(out)
    fin = model.manifest["report"]["finetune"]
    assert fin["steps"] == 3 and len(fin["loss_curve"]) == 3
    assert fin["teacher"]["folder"] == str(tiny.folder.resolve())
    assert fin["data"] == [cts[0].name, cts[1].name]
    assert fin["init"] == "calibrated" and "calibration" in model.manifest["compression"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        assert model.network(x).shape == (1, 4, *PATCH)

    # a compressed-model folder as MODEL: its original (the manifest's source) is the teacher;
    # --resume picks up the work folder of the first run
    out2 = tmp_path / "again"
    code = main(["finetune", str(out), "-i", str(cts[0]), "--steps", "4", "--resume", "--work-dir",
                 str(tmp_path / ".distilled.finetune-work"), "-o", str(out2), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    fin2 = json.loads((out2 / "manifest.json").read_text())["report"]["finetune"]
    assert fin2["resumed_from"] == 3 and len(fin2["loss_curve"]) == 4
    assert fin2["loss_curve"][:3] == fin["loss_curve"]


def test_supervised_mode_reads_an_nnunet_dataset(tiny, data, tmp_path):
    root, cts = data
    ds = tmp_path / "Dataset123_Tiny"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for i in range(2):
        (ds / "imagesTr" / f"case{i}_0000.nii.gz").write_bytes(cts[i].read_bytes())
        (ds / "labelsTr" / f"case{i}.nii.gz").write_bytes((root / f"lab{i}.nii.gz").read_bytes())
    from TuckerSegLib.finetune.workflow import finetune

    summary = finetune(tiny.folder, [], tmp_path / "sup", CompressionSpec(0.5, "uniform"),
                       config=DistillConfig(steps=2, batch_size=1, recipe="classic"), labels_dir=ds,
                       init="hosvd", val_patches=1)
    assert summary["labels"] == str(ds) and summary["data"] == ["case0_0000.nii.gz", "case1_0000.nii.gz"]
    with pytest.raises(InputError, match="imagesTr"):
        finetune(tiny.folder, [], tmp_path / "sup2", CompressionSpec(0.5), labels_dir=tmp_path,
                 config=DistillConfig(recipe="classic"))


def test_preprocessing_matches_nnunet_predictor_input(tiny, shared_data):
    """The arrays are what nnU-Net's predictor feeds the network (its own preprocessing path)."""
    from nnunetv2.inference.data_iterators import PreprocessAdapter
    from TuckerSegLib.models.nnunet_folder import plans_manager

    ct = shared_data / "example_ct_sm.nii.gz"
    (case,) = preprocess(tiny, [ct])
    pm = plans_manager(tiny.plans)
    cm = pm.get_configuration(tiny.configuration)
    adapter = PreprocessAdapter([[str(ct)]], None, cm.preprocessor_class(verbose=False), None, pm,
                                tiny.dataset_json, cm, 1)
    data = adapter.generate_train_batch()["data"]
    np.testing.assert_allclose(case.data, np.asarray(data), rtol=1e-6, atol=1e-6)
    assert case.seg is None and case.data.shape[1:] == (30, 101, 122)


def test_finetune_argument_errors_are_one_line(tiny, data, tmp_path, capsys):
    _, cts = data
    cases = [
        (["--ratio", "0.5", "--device", "gpu"], "no CUDA device" if not torch.cuda.is_available() else None),
        ([], "--ratio is needed"),
        (["--ratio", "1.5"], "ratio must be in (0, 1]"),
    ]
    for extra, expected in cases:
        if expected is None:
            continue
        code = main(["finetune", str(tiny.folder), "-i", str(cts[0]), "--steps", "1", "-o",
                     str(tmp_path / "out"), "--progress", "none", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_distilled_totalseg_model_is_used_by_segment(shared_data, tmp_path, monkeypatch):
    """TotalSegmentator dataset id in, distilled model out, and ``segment`` runs with it."""
    from TuckerSegLib.models import totalseg_layout
    from TuckerSegLib import segment

    home = tmp_path / "home"
    root = home / "nnunet" / "results"
    totalseg_layout.build_models(root, [297], width_scale=0.125)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    (home / "config.json").write_text(json.dumps({"totalseg_id": "totalseg_tests", "send_usage_stats": False,
                                                  "prediction_counter": 0, "statistics_disclaimer_shown": True}))
    ct = shared_data / "example_ct_sm.nii.gz"
    out = tmp_path / "distilled"
    code = main(["finetune", "297", "-i", str(ct), "--ratio", "0.5", "--steps", "2", "--batch-size", "1",
                 "-o", str(out), "--progress", "none"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "Dataset297" in manifest["source"]["folder"] and manifest["report"]["finetune"]["steps"] == 2
    result = segment(ct, tmp_path / "seg.nii.gz", ratio=0.5, fast=True, device="cpu", quiet=True,
                     allow_download=False, compressed_models=[out])
    (used,) = result.models
    assert used["compressed_model"] == str(out)
    assert used["params"] == manifest["report"]["compressed"]["params"]
    assert nib.load(str(tmp_path / "seg.nii.gz")).shape == nib.load(str(ct)).shape


# -- the fast recipe: cached teacher answers, crops, early stop ------------------------------------

CROP = (16, 16, 16)  # the tiny network's stride is 8


def _fast(**kw) -> DistillConfig:
    base = dict(steps=6, lr=2e-3, batch_size=2, checkpoint_every=100, recipe="fast", pool=8,
                precision="f32")
    base.update(kw)
    return DistillConfig(**base)


def test_topk_soft_target_loss_is_kl_when_all_classes_are_kept():
    from TuckerSegLib.finetune.losses import kd_loss, kd_loss_topk
    from TuckerSegLib.finetune.teacher_cache import topk_targets

    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 4, 4, 4, generator=gen) * 3, torch.randn(2, 5, 4, 4, 4, generator=gen)
    for temp in (1.0, 2.0):
        lp, ix = topk_targets(t, 5, temp, torch.float32)
        torch.testing.assert_close(kd_loss_topk(s, lp, ix, temp), kd_loss(s, t, temp))
        assert (ix[:, 0] == t.argmax(1)).all()
    lp, ix = topk_targets(t, 2, 1.0, torch.float32)  # coarser partition: KL can only shrink
    assert 0 <= float(kd_loss_topk(s, lp, ix)) <= float(kd_loss(s, t, 1.0)) + 1e-6
    assert float(kd_loss_topk(t, lp, ix)) < 1e-6  # the teacher itself: zero loss
    # a very confident teacher: log-probabilities below float16's range stay finite (no NaN)
    lp, ix = topk_targets(t * 1e5, 4, 1.0, torch.float16)
    s.requires_grad_(True)
    loss = kd_loss_topk(s, lp, ix)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("classes,k,temp,spread", [(5, 5, 1.0, 1.0), (5, 2, 2.0, 1.0), (118, 8, 1.0, 3.0),
                                                   (118, 16, 1.0, 300.0)])
def test_topk_loss_and_its_closed_form_gradient_equal_autograd(classes, k, temp, spread):
    from TuckerSegLib.finetune.losses import kd_loss_topk, kd_loss_topk_plain
    from TuckerSegLib.finetune.teacher_cache import topk_targets

    gen = torch.Generator().manual_seed(classes + k)
    t = torch.randn(2, classes, 3, 4, 5, generator=gen) * spread
    s = torch.randn(2, classes, 3, 4, 5, generator=gen) * spread  # 300: logits that underflow exp()
    for dtype in (torch.float32, torch.float16):
        lp, ix = topk_targets(t, k, temp, dtype)
        a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        fused, plain = kd_loss_topk(a, lp, ix, temp), kd_loss_topk_plain(b, lp, ix, temp)
        (2.0 * fused).backward()
        (2.0 * plain).backward()
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(a.grad).all() and float(b.grad.abs().max()) > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("classes,batch,spread", [(3, 1, 1.0), (5, 2, 1.0), (118, 2, 3.0), (118, 1, 300.0)])
def test_closed_form_dice_ce_and_its_gradient_equal_nnunets_loss(classes, batch, spread):
    from TuckerSegLib.finetune.losses import dice_ce_loss, nnunet_dice_ce

    gen = torch.Generator().manual_seed(classes + batch)
    s = torch.randn(batch, classes, 3, 4, 5, generator=gen) * spread  # 300: saturated softmax
    labels = torch.randint(0, classes, (batch, 1, 3, 4, 5), generator=gen)
    labels[:, :, 0] = 0  # background, and some classes absent
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ours, theirs = dice_ce_loss(a, labels), nnunet_dice_ce()(b, labels)
    (2.0 * ours).backward()
    (2.0 * theirs).backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(a.grad).all() and float(b.grad.abs().max()) > 0
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-9)
    # labels given as uint8 without the channel axis (the teacher cache's top-1 index) read the same
    torch.testing.assert_close(dice_ce_loss(s, labels[:, 0].to(torch.uint8)), ours.detach())


@pytest.mark.parametrize("classes,k,spread,channels_last,chunk", [(5, 5, 1.0, False, 7), (5, 2, 1.0, True, 7),
                                                                  (118, 8, 3.0, True, 13),
                                                                  (118, 16, 300.0, False, 50)])
def test_the_fused_fast_recipe_loss_equals_its_two_losses_apart(classes, k, spread, channels_last, chunk):
    from TuckerSegLib.finetune.losses import dice_ce_loss, fast_recipe_loss, kd_loss_topk
    from TuckerSegLib.finetune.teacher_cache import topk_targets

    gen = torch.Generator().manual_seed(classes + k)
    t = torch.randn(2, classes, 3, 4, 5, generator=gen) * spread
    s = torch.randn(2, classes, 3, 4, 5, generator=gen) * spread
    if channels_last:
        s = s.contiguous(memory_format=torch.channels_last_3d)
    for dtype in (torch.float32, torch.float16):
        lp, ix = topk_targets(t, k, 1.0, dtype)
        a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        fused = fast_recipe_loss(a, lp, ix, 0.7, 1.3, chunk=chunk)  # chunks that split the voxels unevenly
        apart = 0.7 * kd_loss_topk(b, lp, ix) + 1.3 * dice_ce_loss(b, ix[:, :1])
        (2.0 * fused).backward()
        (2.0 * apart).backward()
        torch.testing.assert_close(fused, apart, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(a.grad).all() and float(b.grad.abs().max()) > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-8)
        assert torch.equal(a.detach(), s)  # the logits are read, never masked in place
    # bfloat16 logits (autocast's output) give a bfloat16 gradient of the same loss
    c = s.to(torch.bfloat16).requires_grad_(True)
    fast_recipe_loss(c, lp, ix).backward()
    assert c.grad.dtype == torch.bfloat16 and c.grad.shape == s.shape


def test_the_closed_form_losses_keep_their_gradients_out_of_the_denormal_range():
    """Logits that spread by 100 (a random-weight network's) made exp() denormal, which x86
    computes with several times slower; the gradients then carried denormals into the network."""
    from TuckerSegLib.finetune.losses import dice_ce_loss, fast_recipe_loss, kd_loss_topk
    from TuckerSegLib.finetune.teacher_cache import topk_targets

    gen = torch.Generator().manual_seed(5)
    t = torch.randn(2, 118, 4, 5, 6, generator=gen) * 30
    s = torch.randn(2, 118, 4, 5, 6, generator=gen) * 30
    lp, ix = topk_targets(t, 8, 1.0, torch.float16)
    tiny = torch.finfo(torch.float32).tiny
    for loss_fn in (lambda x: fast_recipe_loss(x, lp, ix), lambda x: kd_loss_topk(x, lp, ix),
                    lambda x: dice_ce_loss(x, ix[:, :1])):
        a = s.clone().requires_grad_(True)
        loss_fn(a).backward()
        g = a.grad.abs()
        assert torch.isfinite(g).all() and not ((g > 0) & (g < tiny)).any()


def test_cached_teacher_answers_give_the_same_first_steps_as_recomputed(tiny, data, tmp_path):
    cases, _, student = _setup_distill(tiny, data)
    init = {k: v.clone() for k, v in student.state_dict().items()}
    runs = {}
    for name, kw in {"recomputed": dict(cache_teacher=False, exact_cache=True),
                     "cached": dict(exact_cache=True), "cached_fp16": dict(topk=2)}.items():
        s = _setup_distill(tiny, data)[2]
        s.load_state_dict(init)
        runs[name] = distill(tiny.network, s, PatchSampler(cases, CROP, seed=1), _fast(steps=3, **kw),
                             tmp_path / name)
    np.testing.assert_allclose(runs["cached"].loss_curve, runs["recomputed"].loss_curve, rtol=1e-5)
    assert runs["cached"].extra["teacher_cache"]["topk"] == 4  # all classes of the tiny model
    # float16 top-2 answers: close to the exact ones, not equal
    np.testing.assert_allclose(runs["cached_fp16"].loss_curve[0], runs["cached"].loss_curve[0], rtol=0.1)


def test_fast_recipe_lowers_loss_and_raises_held_out_agreement(tiny, data, tmp_path):
    cases, held_out, student = _setup_distill(tiny, data)
    res = distill(tiny.network, student, PatchSampler(cases, CROP, seed=0),
                  _fast(steps=40, pool=16, keep_best=False), tmp_path / "work", val_patches=held_out)
    first, last = np.mean(res.loss_curve[:5]), np.mean(res.loss_curve[-5:])
    assert last < 0.8 * first, (first, last)
    before, after = res.agreement_before, res.agreement_after
    assert after["mean_dice"] > before["mean_dice"] + 0.02, (before, after)
    assert res.extra["teacher_cache"]["crop"] == list(CROP) and res.extra["steps_per_second"] > 0


def test_fast_resume_equals_an_uninterrupted_run(tiny, data, tmp_path):
    cases, _, student = _setup_distill(tiny, data, ratio=0.5)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    config = _fast(steps=6, checkpoint_every=2)

    def fresh_student():
        s = _setup_distill(tiny, data, ratio=0.5)[2]
        s.load_state_dict(initial)
        return s

    from TuckerSegLib.compression.ct_patches import Augment

    def sampler(seed=4):  # augmented transfer set: its random state must survive the restart too
        return PatchSampler(cases, CROP, seed=seed, augment=Augment())

    full = distill(tiny.network, fresh_student(), sampler(), config, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        distill(tiny.network, fresh_student(), sampler(), config, tmp_path / "b",
                progress=_StopAt(5, config.steps))
    resumed = distill(tiny.network, fresh_student(), sampler(seed=999), config, tmp_path / "b",
                      resume=True)
    assert resumed.resumed_from == 4 and resumed.loss_curve[:4] == full.loss_curve[:4]
    np.testing.assert_allclose(resumed.loss_curve[4:], full.loss_curve[4:], rtol=1e-5)
    for (k, a), b in zip(full.network.state_dict().items(), resumed.network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    # the student trains channels-last on CPUs (checkpoints switch layout to write and read) and
    # comes back in the default layout
    assert all(p.is_contiguous() for p in resumed.network.parameters())


def test_a_run_that_makes_the_student_worse_returns_the_best_one_measured(tiny, data, tmp_path):
    cases, held_out, student = _setup_distill(tiny, data, ratio=0.5)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    # a learning rate that wrecks the student: every later check agrees less than the start
    config = _fast(steps=4, lr=1.0, grad_clip=0.0, eval_every=2)
    res = distill(tiny.network, student, PatchSampler(cases, CROP, seed=0), config, tmp_path / "w",
                  val_patches=held_out)
    last, kept = res.extra["last_agreement"], res.agreement_after
    assert last["mean_dice"] < res.agreement_before["mean_dice"] - 0.05, (last, res.agreement_before)
    assert res.extra["kept_step"] == 0 and kept == res.agreement_before
    for k, v in res.network.state_dict().items():
        torch.testing.assert_close(v, initial[k], msg=k)
    assert [e["step"] for e in res.agreement_curve] == [2, 4]
    # --keep-last: the wrecked student itself
    s2 = _setup_distill(tiny, data, ratio=0.5)[2]
    s2.load_state_dict(initial)
    res2 = distill(tiny.network, s2, PatchSampler(cases, CROP, seed=0), _fast(steps=4, lr=1.0, grad_clip=0.0,
                   eval_every=2, keep_best=False), tmp_path / "w2", val_patches=held_out)
    assert res2.agreement_after == last and res2.extra["kept_step"] == 4


def test_until_agreement_and_max_minutes_stop_and_save_a_resumable_checkpoint(tiny, data, tmp_path):
    cases, held_out, student = _setup_distill(tiny, data)
    res = distill(tiny.network, student, PatchSampler(cases, CROP), _fast(steps=50, until_agreement=0.0,
                  eval_every=2), tmp_path / "a", val_patches=held_out)
    assert res.stopped == "agreement" and res.steps == 2 and res.agreement_curve[0]["step"] == 2
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step_000002"]
    res = distill(tiny.network, student, PatchSampler(cases, CROP), _fast(steps=50, max_minutes=1e-9),
                  tmp_path / "b")
    assert res.stopped == "time" and res.steps == 1
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_000001"]
    res = distill(tiny.network, student, PatchSampler(cases, CROP), _fast(steps=3), tmp_path / "b",
                  resume=True)
    assert res.resumed_from == 1 and res.steps == 3 and res.stopped == "steps"


def test_planned_steps_fit_the_time_left_with_the_checks_and_stay_in_bounds():
    assert planned_steps(3, 100.0, 1.0, 0.0, 10, 10 ** 6) == 103
    assert planned_steps(3, 100.0, 1.0, 10.0, 10, 10 ** 6) == 53  # a 10 s check every 10 steps
    assert planned_steps(3, 100.0, 1.0, 0.0, 10, 50) == 50  # never more than --steps
    assert planned_steps(3, -5.0, 1.0, 0.0, 10, 50) == 4  # out of time: at least the next step


def test_a_time_capped_run_anneals_its_learning_rate_and_resume_keeps_the_schedule(tiny, data, tmp_path):
    cases, _, student = _setup_distill(tiny, data)
    config = _fast(steps=10 ** 6, max_minutes=0.05, lr=2e-3)
    res = distill(tiny.network, student, PatchSampler(cases, CROP), config, tmp_path / "w")
    horizon = res.extra["schedule_steps"]
    assert res.stopped == "time" and res.steps > 3 and horizon < 10 ** 6
    # cosine over --steps would still be at 2e-3 here; fitted to the cap it has annealed
    assert res.extra["last_lr"] < 0.9 * config.lr
    res2 = distill(tiny.network, student, PatchSampler(cases, CROP), _fast(steps=10 ** 6, max_minutes=0.02),
                   tmp_path / "w", resume=True)
    assert res2.resumed_from == res.steps and res2.extra["schedule_steps"] == horizon


def test_finetune_fast_with_phantoms_records_what_it_trained_and_validated_on(tiny, data, tmp_path, capsys):
    _, cts = data
    out = tmp_path / "fast"
    code = main(["finetune", str(tiny.folder), "-i", str(cts[0]), "--phantoms", "1", "--augment",
                 "--ratio", "0.5", "--policy", "uniform", "--steps", "4", "--crop", "16x16x16", "--pool", "4",
                 "--val", str(cts[2]), "--val-patches", "2", "--until-agreement", "1.0", "--eval-every", "2",
                 "-o", str(out), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "fast recipe" in printed and "1 phantom(s)" in printed and "held-out CTs" in printed
    fin = load_compressed(out).manifest["report"]["finetune"]
    assert fin["recipe"] == "fast" and fin["stopped"] in ("steps", "agreement")
    ts = fin["transfer_set"]
    assert ts["cts"] == [cts[0].name] and ts["phantoms"] == 1 and ts["augmentation"] and ts["crop"] == [16] * 3
    assert ts["teacher_cache"]["patches"] == 4
    val = fin["validation"]
    assert val["held_out"] is True and val["data"] == [cts[2].name] and val["patches"] == 2
    assert val["patch_size"] == list(PATCH) and 0 <= val["after"]["mean_dice"] <= 1
    assert [e["step"] for e in fin["agreement_curve"]] == [2, 4]
    # the fast recipe caches no labels
    code = main(["finetune", str(tiny.folder), "--labels", str(tmp_path), "--ratio", "0.5", "-o",
                 str(tmp_path / "x"), "--progress", "none"])
    assert code == 2 and "--recipe classic" in capsys.readouterr().err
    # a crop the U-Net cannot take (not a multiple of its stride) is refused before any work
    code = main(["finetune", str(tiny.folder), "-i", str(cts[0]), "--ratio", "0.5", "--crop", "12x16x16",
                 "-o", str(tmp_path / "y"), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "multiples of the network's stride" in err and not (tmp_path / "y").exists()
