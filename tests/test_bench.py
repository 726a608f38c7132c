"""bench.py --quick writes its results and figure, and the JSON holds every method and model it names; errors are
one-line messages."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_writes_results_and_figure(tmp_path):
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    assert set(results["scaling"]) == {"scan (parallel)", "scan (reference loop)", "attention (naive)",
                                       "attention (SDPA)"}
    for method in results["scaling"].values():
        assert all(p["fwd_bwd_ms"] > 0 for p in method["points"] if "fwd_bwd_ms" in p)
        assert method["slope_fwd_bwd_ms"] is not None
    for model in ("mamba", "transformer"):
        assert [p["batch"] for p in results["models"]["generation"][model]["points"]] == [1, 2, 4]
        assert all(p["tokens_per_s"] > 0 for p in results["models"]["generation"][model]["points"])
    assert all(f"generation (tokens/s), {n} new tokens" in done.stdout for n in (8, 16))
    models = results["models"]
    assert (tmp_path / "models.png").stat().st_size > 10_000
    for section, x, lengths in (("prefill", "length", [16, 32, 64]), ("training", "length", [16, 32, 64]),
                                ("decoding", "context", [16, 64, 16, 64])):
        for model in ("mamba", "transformer"):
            points = models[section][model]
            assert [p[x] for p in points] == lengths and all(p["ms"] > 0 for p in points), (section, model)
    assert all(models["training"]["mamba"][i]["batch"] * n == 128 for i, n in enumerate([16, 32, 64]))  # tokens/step
    assert [p["batch"] for p in models["generation_long"]["mamba"]["points"]] == [1, 2, 4]
    for size in ("tiny", "vit-tiny"):                                # --quick: the tiny sizes, 16 and 32 px
        vision = results["vision"][size]
        assert [p["side"] for p in vision["points"]] == [16, 32] and all(p["images_per_s"] > 0 for p in vision["points"])
        assert vision["slope_ms"] is not None
    floors = models["floors"]
    assert floors["prefill"]["ms"] > 0 and floors["prefill"]["ours_over_floor"] > 0
    assert set(floors["decode_ours_over_floor"]) == {"1", "2"} and floors["bandwidth_bytes_per_s"] > 0


@pytest.mark.parametrize("anchors, message", [(None, "needs a GPU"), ("missing.json", "no reference timings at")])
def test_kernel_section_needs_a_gpu_and_the_reference_timings_before_any_work(tmp_path, anchors, message):
    out = tmp_path / "out"
    extra = ["--anchors", str(tmp_path / anchors)] if anchors else []
    done = subprocess.run([sys.executable, "bench.py", "--kernel", "--device", "cpu", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()                                          # stopped before making its output folder


def test_an_output_folder_that_cannot_be_made_is_a_message_before_any_work(tmp_path):
    (tmp_path / "a file").write_text("")
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--device", "cpu", "--out",
                           str(tmp_path / "a file" / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cannot create the output folder" in done.stderr
    assert "Traceback" not in done.stderr and "scaling" not in done.stdout            # stopped before measuring


def test_a_time_limit_that_is_not_positive_is_a_usage_message(tmp_path):
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--device", "cpu", "--max-seconds", "0", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "argument --max-seconds: 0: must be above 0" in done.stderr


def test_the_sections_that_run_alone_cannot_be_combined(tmp_path):
    done = subprocess.run([sys.executable, "bench.py", "--kernel", "--selective-copying", "--device", "cpu", "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not allowed with argument --kernel" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("section, names", [("vision", {"tiny", "vit-tiny"}),
                                             ("models", {"prefill", "decoding", "training", "generation"})])
def test_a_section_alone_writes_its_results_and_figure_and_nothing_else(tmp_path, section, names):
    done = subprocess.run([sys.executable, "bench.py", "--quick", f"--{section}", "--device", "cpu", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / f"{section}.json").read_text())[section]
    assert names <= set(results) and (tmp_path / f"{section}.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{section}.json", f"{section}.png"]   # nothing else ran
    assert "scaling" not in done.stdout
