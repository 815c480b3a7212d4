"""The benchmark scripts run end to end and write complete JSON."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TIMED = ("--repeats=2", "--warmup=1")


def run_module(module, tmp_path, *flags, timing_flags=True):
    """Runs a benchmark script; its JSON and stdout. `timing_flags` adds the
    small batch and the few repeats that the timing scripts take."""
    output = tmp_path / f"{module}.json"
    timed = () if module == "memory" else TIMED
    if timing_flags:
        flags = ("--batch_size=2", *timed, *flags)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            f"benchmarks.{module}",
            f"--output={output}",
            *flags,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(output) as fh:
        return json.load(fh), done.stdout


@pytest.mark.large  # a timing or memory harness: --run-large
def test_solver_overhead_script(tmp_path):
    data, stdout = run_module(
        "solver_overhead", tmp_path, "--iters=4", "--cells=mlp,conv"
    )
    results = data["results"]
    assert len(results) == 2 * 3 * 2  # cells × solvers × XLA settings
    for r in results:
        assert r["nfe"] == 4  # the tolerance never triggers
        assert r["batch_size"] == 2
        for key in ("f_seconds", "solve_seconds"):
            t = r[key]
            assert 0 < t["min"] <= t["median"] <= t["max"]
        assert r["ratio"] > 0
    assert "tensorflow" in data["versions"]
    assert "solve/(nfe*f)" in stdout


@pytest.mark.large
def test_training_step_script(tmp_path):
    data, stdout = run_module(
        "training_step", tmp_path, "--iters=3", "--cells=mlp"
    )
    runs = {(r["mode"], r["jacobian"]): r for r in data["results"]}
    assert set(runs) == {
        (mode, jac)
        for mode in ("implicit", "reuse0", "reuse2", "reuse4", "phantom")
        + ("unrolled",)
        for jac in (False, True)
    }
    for (mode, jac), r in runs.items():
        assert r["step_seconds"]["median"] > 0
        # the first call traces the step: slower than a traced one
        assert r["first_call_seconds"] > r["step_seconds"]["min"]
        assert r["iters"] == 3
        assert r["ratio_to_unrolled"] == (
            r["step_seconds"]["median"]
            / runs["unrolled", jac]["step_seconds"]["median"]
        )
        assert r["ratio_to_penalty_off"] == (
            r["step_seconds"]["median"]
            / runs[mode, False]["step_seconds"]["median"]
        )
    assert runs["unrolled", False]["ratio_to_unrolled"] == 1.0
    assert "/ unrolled" in stdout and "/ off" in stdout


@pytest.mark.large
def test_backward_tradeoff_script(tmp_path):
    """On the MLP cell (a contraction, ‖W‖ = 0.9): 20 implicit backward
    iterations give the tightly solved gradient; one phantom step does not."""
    data, stdout = run_module(
        "backward_tradeoff", tmp_path, "--iters=20", "--cells=mlp"
    )
    (cell,) = data["results"]["cells"]
    rows = {r["config"]: r for r in cell["configs"]}
    assert set(rows) == {
        "implicit-anderson",
        "implicit-broyden",
        "reuse0",
        "reuse2",
        "reuse4",
        "phantom",
    }
    for row in rows.values():
        assert row["step_over_f"] == (
            row["step_seconds"]["median"] / cell["f_seconds"]["median"]
        )
        assert -1.0 <= row["cosine"] <= 1.0 + 1e-6
    for name in ("implicit-anderson", "implicit-broyden"):
        assert rows[name]["relative_error"] < 1e-3, rows[name]
    assert rows["phantom"]["relative_error"] > 1e-2
    assert "backward residual" in stdout and "cosine" in stdout


TORCH_PYTHON = os.environ.get("KERAS_DEQ_TORCH_PYTHON")


@pytest.mark.parametrize(
    "python",
    [
        "/nonexistent/bin/python",
        pytest.param(
            sys.executable,
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torchdeq") is not None,
                reason="this interpreter has torchdeq",
            ),
        ),
    ],
)
def test_compare_torchdeq_skips_without_torchdeq(tmp_path, python):
    data, stdout = run_module(
        "compare_torchdeq", tmp_path, f"--torch_python={python}"
    )
    assert "Skipped: TorchDEQ is not available" in stdout
    assert "pip install torch==2.13.0 torchdeq==0.1.0" in stdout
    assert python in data["results"]["skipped"]


@pytest.mark.skipif(
    not TORCH_PYTHON,
    reason="KERAS_DEQ_TORCH_PYTHON (an interpreter with torch and torchdeq) "
    "is not set",
)
def test_compare_torchdeq_script(tmp_path):
    """TorchDEQ and keras_deq on JAX compute TensorFlow's f, iterate and
    unrolled gradient, and make exactly `--iters` evaluations in every
    timed row."""
    data, stdout = run_module(
        "compare_torchdeq",
        tmp_path,
        "--iters=3",
        "--cells=mlp,transformer",
        f"--torch_python={TORCH_PYTHON}",
    )
    results = data["results"]
    assert results["torch"]["torchdeq"] == "0.1.0"
    assert results["jax"]["jax"]
    for cell in results["cells"]:
        assert set(cell["check"]) == {"TorchDEQ", "JAX"}
        for check in cell["check"].values():
            assert max(check.values()) < 1e-5, cell["check"]
        rows = {r["label"]: r for r in cell["rows"]}
        assert len(rows) == 10
        reference = rows["step, implicit, Anderson"]["torchdeq"]["median"]
        for label, row in rows.items():
            theirs = row.get("torchdeq", {"median": reference})
            assert row["ratio"] == row["keras_deq"]["median"] / theirs["median"]
            assert row["ratio_jax"] == (
                row["keras_deq_jax"]["median"] / theirs["median"]
            )
            if label != "one f":
                assert row["keras_deq_nfe"] == row["keras_deq_jax_nfe"] == 3
            if "torchdeq" in row and label != "one f":
                assert row["torchdeq_nfe"] == 3, row
    assert "keras_deq TF ms" in stdout and "TorchDEQ ms" in stdout
    assert "keras_deq JAX ms" in stdout


@pytest.mark.large  # a timing or memory harness: --run-large
def test_memory_script(tmp_path):
    plot = tmp_path / "memory.png"
    data, stdout = run_module(
        "memory",
        tmp_path,
        "--cells=mlp",
        "--iters=2",
        "--broyden_memory=1",
        f"--plot={plot}",
    )
    results = data["results"]
    assert [(r["mode"], r["iters"]) for r in results] == [
        ("implicit", 2),
        ("unrolled", 2),
    ]
    for r in results:
        assert r["batch_size"] == 2 and r["solver"] == "broyden"
        assert r["broyden_memory"] == 1
        assert 0 < r["baseline_mb"] <= r["peak_mb"]
        assert r["step_mb"] == r["peak_mb"] - r["baseline_mb"]
    assert results[0]["ratio_to_first"] == 1.0
    with open(plot, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "/ smallest max_iter" in stdout


@pytest.mark.large
def test_warm_start_script(tmp_path):
    data, stdout = run_module(
        "warm_start",
        tmp_path,
        "--cells=mlp",
        "--batch_size=8",
        "--steps=5",
        "--train_steps=5",
        "--repeats=1",
        timing_flags=False,
    )
    (result,) = data["results"]
    assert len(result["steps"]) == 5
    # The first iterate is the last output: the drifted input's equilibrium
    # is close to it, so the warm solves need fewer iterations.
    assert result["warm_nfe"] < result["cold_nfe"]
    # Both stop within tol = 1e-3 (relative) of the same equilibrium.
    assert result["max_relative_difference"] < 5e-3
    assert "warm NFE" in stdout


@pytest.mark.large
def test_generation_script(tmp_path):
    data, stdout = run_module(
        "generation",
        tmp_path,
        "--hidden_dim=32",
        "--intermediate_dim=64",
        "--num_chars=20000",
        "--epochs=1",
        "--prompts=4",
        "--new_tokens=8",
        "--speed_prompt=16",
        "--speed_tokens=8",
        "--batch_sizes=8",
        "--repeats=1",
        f"--weights={tmp_path / 'lm.weights.h5'}",
        f"--plot={tmp_path / 'generation.png'}",
        timing_flags=False,
    )
    agree = data["results"]["agreement"]
    assert agree["prompts"] == 4 and agree["new_tokens"] == 8
    # (A model trained this briefly converges too loosely for the 10 × tol
    # bound; tests/models/test_deq_transformer_cache.py checks it on one
    # trained longer.)
    assert 0 <= agree["logit_error_median"] <= agree["logit_error_max"]
    assert agree["identical"] + len(agree["differing"]) == 4
    (speed,) = data["results"]["speed"]
    assert len(speed["cached_per_token_s"]) == len(speed["full_per_token_s"])
    assert len(speed["cached_per_token_s"]) == 8
    # One position's solve per token against the whole sequence's.
    assert speed["cached_tokens_per_s"] > speed["full_tokens_per_s"]
    assert (tmp_path / "generation.png").stat().st_size > 0
    assert "speed-up" in stdout


@pytest.mark.large
def test_mdeq_equilibrium_script(tmp_path):
    pytest.importorskip("sklearn")
    plot = tmp_path / "levers.png"
    data, stdout = run_module(
        "mdeq_equilibrium",
        tmp_path,
        "--levers=unrolled_random",
        "--epochs=1",
        "--starts=1",
        f"--plot={plot}",
        timing_flags=False,
    )
    (run,) = data["runs"]
    assert run["random_start"] == 1.0
    rows = run["report"]["rows"]
    assert [row["max_iter"] for row in rows] == [7, 28]
    assert all(0 <= row["metric"] <= 1 for row in rows)
    assert 0 <= run["report"]["path"]["agreement"] <= 1
    assert "unrolled_random" in stdout
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.large
def test_mdeq_equilibrium_step_times(tmp_path):
    pytest.importorskip("sklearn")
    data, stdout = run_module(
        "mdeq_equilibrium",
        tmp_path,
        "--levers=unrolled,defaults",
        "--step_times=2",
        timing_flags=False,
    )
    times = data["step_times"]
    assert set(times) == {"unrolled", "defaults"}
    for t in times.values():
        assert 0 < t["min"] <= t["median"] <= t["max"]
    assert "x unrolled" in stdout


@pytest.mark.large
def test_lm_equilibrium_script(tmp_path):
    data, stdout = run_module(
        "lm_equilibrium",
        tmp_path,
        "--epochs=1",
        "--starts=1",
        timing_flags=False,
    )
    (run,) = data["runs"]
    # The report's perplexity at 1x is the model's own evaluate's.
    np.testing.assert_allclose(
        run["rows"][0]["perplexity"], run["perplexity"], rtol=1e-3
    )
    assert [row["max_iter"] for row in run["rows"]] == [12, 24, 48]
    assert 0 <= run["path"]["agreement"] <= 1


def test_gpu_check_runs_its_rows_at_tiny_sizes(tmp_path):
    """The GPU script's CPU path: each row in its own JAX process, the
    cells at exactly `--iters` forward evaluations, TorchDEQ beside them
    where this interpreter (or KERAS_DEQ_TORCH_PYTHON) has torch."""
    torch_python = TORCH_PYTHON or sys.executable
    data, stdout = run_module(
        "gpu_check",
        tmp_path,
        "--tiny",
        "--rows=MDEQ,conv cell",
        "--iters=3",
        "--warmup=1",
        "--repeats=1",
        f"--torch_python={torch_python}",
        f"--site={tmp_path / 'site'}",
        timing_flags=False,
    )
    rows = data["rows"]
    mdeq, conv, torchdeq = rows
    assert data["tiny"] and data["seconds"] < 300
    assert (mdeq["row"], mdeq["library"]) == ("MDEQ", "keras_deq (JAX)")
    # The paper's MDEQ solves for at most its 7 forward iterations.
    assert 1 <= mdeq["nfe"] <= 7
    assert (conv["row"], conv["nfe"]) == ("conv cell", 3.0)
    for row in (mdeq, conv):
        assert row["step_ms"] > 0 and row["peak_mb"] is None  # a CPU
        assert row["device"].startswith("cpu")
    if importlib.util.find_spec("torch") is None and not TORCH_PYTHON:
        assert torchdeq == {"row": "conv cell", "skipped": "torch is missing"}
        assert "skipped: torch is missing" in stdout
    else:
        assert torchdeq["nfe"] == 3.0 and torchdeq["step_ms"] > 0
    assert "step ms" in stdout and "peak MB" in stdout


def test_gpu_check_says_how_to_get_what_it_lacks(tmp_path):
    from benchmarks import gpu_check

    args = gpu_check.parse(
        [f"--wheels={tmp_path / 'none'}", f"--site={tmp_path / 'site'}"]
    )
    assert gpu_check.install(["keras"], args) == args.site  # present
    with pytest.raises(SystemExit, match=r"no_such_module.*pip download"):
        gpu_check.install(["no_such_module"], args)
    with pytest.raises(SystemExit):
        gpu_check.parse(["--rows=MDEQ,cnn"])
