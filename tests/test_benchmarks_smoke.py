"""Keep the benchmark scripts from rotting: run each in its --quick mode.

Asserts only that it runs, prints its table and writes its results file, never timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("peft")


def _run_script(
    name: str, *args: str, results: Path, part: str = "", timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run benchmarks/<name> with this checkout importable; fail with its output if it fails.

    The script writes its results file into ``results``: it must be the ``-quick`` one, with
    every required field and at least one table. ``timeout`` only guards against a hang: on a
    2-core machine shared with other jobs a quick run has taken over 300 s.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args, "--results-dir", str(results)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    path = results / f"{Path(name).stem}-cpu{'-' + part if part else ''}-quick.json"
    assert [p.name for p in results.iterdir()] == [path.name]
    data = json.loads(path.read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _results import validate
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert validate(data) == [] and data["quick"] and data["tables"], data
    return proc


def _goals(path: Path) -> list[dict]:
    return json.loads(next(path.glob("*.json")).read_text())["goals"]


def test_bench_lora_quick_mlp_runs_and_prints_table(tmp_path):
    proc = _run_script(
        "bench_lora.py", "--quick", "--models", "mlp", "--markdown", results=tmp_path
    )
    out = proc.stdout
    assert "FAILED" not in proc.stderr, proc.stderr  # a memory worker failed
    header = next(line for line in out.splitlines() if line.startswith("model "))
    for col in ("variant", "trainable", "train ms", "eval ms", "vs merged", "train RSS MB"):
        assert col in header
    for variant in ("base", "factored", "materialized", "peft", "merged"):
        assert any(line.split()[:2] == ["mlp-b10", variant] for line in out.splitlines()), variant
    assert any(line.startswith("mlp-b256 ") for line in out.splitlines())
    assert "| model | variant |" in out  # --markdown table
    assert "MISMATCH" not in out  # every LoRA variant computes what the merged model computes
    goals = [line for line in out.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert goals, out  # goal lines are printed (their verdicts are not asserted: timings vary)
    # the training-step check needs our trainable count to equal PEFT's (same tensors adapted)
    rows = {
        tuple(line.split()[:2]): line.split()
        for line in out.splitlines()
        if line.startswith("mlp-b10 ")
    }
    assert rows[("mlp-b10", "factored")][2] == rows[("mlp-b10", "peft")][2] == "6,794"
    assert len(_goals(tmp_path)) == len(goals)  # every printed goal is in the results file


def test_bench_llm_quick_generation_runs_and_prints_goals(tmp_path):
    pytest.importorskip("transformers")
    proc = _run_script(
        "bench_llm.py", "--quick", "--dtype", "bf16", "--phases", "generate", "--markdown",
        results=tmp_path, part="bf16",
    )  # fmt: skip
    out = proc.stdout
    assert "not measured" not in proc.stderr, proc.stderr
    rows = {tuple(line.split()[:2]) for line in out.splitlines()}
    for variant in ("merged", "lora", "lora-cache-always", "lora-nf4", "peft"):
        assert ("generate", variant) in rows, variant
    assert "| phase | variant |" in out
    goals = [line for line in out.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert any("generate peak ours" in line for line in goals), out
    assert "peaks" in out and "above the default 'auto' policy" in out  # the cache's cost
    assert len(_goals(tmp_path)) == len(goals)


def test_bench_mixed_quick_runs_and_prints_goals(tmp_path):
    """bench_mixed.py --quick: every variant timed, outputs checked against PEFT's, goals out."""
    out = _run_script(
        "bench_mixed.py", "--quick", "--no-memory", "--repeats", "1", results=tmp_path
    ).stdout
    assert "(MATCH)" in out and "MISMATCH" not in out, out
    for variant in ("ours one", "ours mixed", "peft one", "peft mixed"):
        assert any(line.startswith(variant) for line in out.splitlines()), variant
    goals = [line for line in out.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert len(goals) == 2 == len(_goals(tmp_path)), out


def test_bench_dora_quick_runs_and_prints_goals(tmp_path):
    """bench_dora.py --quick on the MLP: ours and PEFT's LoRA and DoRA timed, goals printed."""
    out = _run_script(
        "bench_dora.py", "--quick", "--no-memory", "--models", "mlp", "--repeats", "1",
        results=tmp_path,
    ).stdout  # fmt: skip
    rows = {tuple(line.split()[:2]) for line in out.splitlines()}
    for variant in ("lora", "dora", "dora-materialized", "peft-lora", "peft-dora"):
        assert ("mlp", variant) in rows, variant
    assert "| model | variant |" in out
    goals = [line for line in out.splitlines() if line.startswith(("met ", "MISSED "))]
    assert goals and len(goals) == len(_goals(tmp_path)), out


def test_bench_variants_quick_builds_each_variant_as_peft_does(tmp_path):
    """bench_variants.py --quick on the MLP: ours and PEFT's variants timed, the same trainable
    tensors on both sides, one goal per variant PEFT has."""
    variants = ["lora", "dora", "loha", "lokr", "oft-input", "oft-output"]
    out = _run_script(
        "bench_variants.py", "--quick", "--models", "mlp", "--repeats", "1", "--no-memory",
        "--variants", *variants, results=tmp_path,
    ).stdout  # fmt: skip
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {r["variant"]: r for r in data["tables"][0]["rows"]}
    import lora_param

    have = [v for v in variants if v.removesuffix("-input").removesuffix("-output")
            in lora_param.variant_names()]  # fmt: skip
    assert list(rows) == have and len(_goals(tmp_path)) == len(have) - 1, out
    for name, row in rows.items():  # PEFT adapts the same tensors, with the same sizes
        assert row["PEFT trainable"] == (None if name == "oft-output" else row["trainable"])


def test_bench_quantize_quick_times_the_dequantize(tmp_path):
    """bench_quantize.py --quick: packing memory per method, dequantize time per kernel."""
    out = _run_script("bench_quantize.py", "--quick", "--threads", "1", results=tmp_path).stdout
    assert "| nf4 | 4.1" in out and "| int8 | 8.0" in out, out
    assert "| torch | fp32 | 1 |" in out and "| torch | bf16 | 1 |" in out, out
    assert len(_goals(tmp_path)) == 2


def test_bench_mixed_memory_worker_measures_the_cached_stacks():
    """The fresh-process worker of ``ours mixed`` finds the stacked factors it reports."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_mixed.py"), "--memory-worker",
         "ours mixed", "--quick", "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["stack_mb"] > 0
