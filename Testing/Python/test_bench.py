"""``tuckerseg bench`` end to end on a small network of the TotalSegmentator family."""
import importlib.util  # noqa: F401  (the CLI dispatcher expects it loaded)
import json

import pytest

from TuckerSegLib.cli.main import main


@pytest.mark.slow
def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--progress", "none", "--archs", "tiny", "--ratios", "1.0", "0.3",
                 "--policies", "paper", "--configs", "torch:f32", "openvino:f32", "--reps", "1",
                 "--warmup", "1", "--json", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "MAC lim" in printed
    result = json.loads(out.read_text())
    rows = result["rows"]
    kinds = {(r["policy"], r["ratio"], r["engine"], r["precision"]) for r in rows}
    assert kinds == {("stock", 1.0, "torch-eager", "f32"), ("dense", 1.0, "torch", "f32"),
                     ("dense", 1.0, "openvino", "f32"), ("paper", 0.3, "torch", "f32"),
                     ("paper", 0.3, "openvino", "f32")}
    stock = next(r for r in rows if r["policy"] == "stock")
    for r in rows:
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0
        assert abs(r["speedup"] - stock["seconds"] / r["seconds"]) < 1e-9
    paper = [r for r in rows if r["policy"] == "paper"]
    assert all(r["macs_ratio"] < 1 for r in paper)
    ov = next(r for r in paper if r["engine"] == "openvino")
    assert ov["agreement_vs_torch_f32"] >= 0.9999  # same compressed network, f32 on both engines
    assert out.with_suffix(".png").stat().st_size > 1000
    assert result["auto"]["auto"]["precision"] == "f32"


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--progress", "none", "--archs", "tiny", "--ratios", "1.5",
                 "--json", str(tmp_path / "b.json")]) == 2
    assert "ratios must be in (0, 1]" in capsys.readouterr().err
    assert main(["bench", "--progress", "none", "--no-per-patch", "--end-to-end",
                 str(tmp_path / "missing.nii.gz")]) == 2
    assert "CT not found" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_bench_script(tmp_path, shared_data):
    """benchmarks/bench_segment_end_to_end.py: stock TotalSegmentator and TuckerSeg runs side by side
    on a real CT, with speed-up, MAC limit and peak memory (narrow test models keep it short)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(repo / "benchmarks" / "bench_segment_end_to_end.py"),
           "--ct", str(shared_data / "example_ct_sm.nii.gz"), "--mode", "fast", "--ratios", "1.0", "0.3",
           "--policy", "paper", "--configs", "torch:f32", "--width-scale", "0.125", "--repeats", "1",
           "--workdir", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "speed-up" in done.stdout and "MAC lim" in done.stdout and "peak MB" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["ratio"] for r in rows] == [None, 1.0, 0.3]
    assert rows[0]["run"] == "stock TotalSegmentator" and rows[2]["run"] == "tuckerseg torch:f32"
    assert rows[1]["macs_ratio"] == 1.0
    # (at an eighth of the width the study's rank floor of 16 leaves little to cut; the ratio is
    # whatever the factorised network costs)
    assert rows[2]["macs"] != rows[2]["macs_original"]
    assert rows[2]["macs_ratio"] == pytest.approx(rows[2]["macs"] / rows[2]["macs_original"])
    for r in rows:
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 100  # torch and nnU-Net alone take more
        assert abs(r["speedup"] - rows[0]["seconds"] / r["seconds"]) < 1e-9
    assert out.with_suffix(".png").stat().st_size > 1000
