"""The benchmark page is rendered from the results files the scripts wrote, never typed.

docs/benchmarks.md must be exactly what benchmarks/render_results.py makes of the committed
benchmarks/results/*.json, and every results file must carry what makes its numbers
reproducible (machine, versions, date, command, rows, goals).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
PAGE = ROOT / "docs" / "benchmarks.md"


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results_mod() -> ModuleType:
    return _load("_results")


@pytest.fixture(scope="module")
def render_mod() -> ModuleType:
    return _load("render_results")


def _committed_files() -> list[Path]:
    return sorted(p for p in RESULTS.glob("*.json") if not p.stem.endswith("-quick"))


def test_page_is_what_the_renderer_makes_of_the_results(render_mod) -> None:
    assert PAGE.is_file(), "docs/benchmarks.md is missing: python benchmarks/render_results.py"
    assert PAGE.read_text() == render_mod.render(RESULTS), (
        "docs/benchmarks.md differs from the results files: run "
        "`python benchmarks/render_results.py` (never edit the page by hand)"
    )


def test_every_results_file_is_complete(results_mod) -> None:
    files = _committed_files()
    assert files, "no results files in benchmarks/results"
    for path in files:
        data = json.loads(path.read_text())
        assert results_mod.validate(data) == [], path.name
        assert not data["quick"], path.name
        name = results_mod.results_path(".", data["script"], data["device"], False, data["part"])
        assert path.name == name.name
        assert (BENCH / f"{data['script']}.py").is_file(), f"{path.name}: no such script"
        assert data["tables"], f"{path.name}: no table"
        assert data["load_average"]["start"] and data["load_average"]["end"], path.name
        for goal in data["goals"]:
            assert goal["verdict"] in ("PASS", "FAIL", "n/a"), (path.name, goal)


def test_every_benchmark_script_has_a_results_file() -> None:
    scripts = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")}
    scripts.discard("render_results")
    have = {json.loads(p.read_text())["script"] for p in _committed_files()}
    assert scripts - have == set(), "run these scripts and commit their results files"


def test_no_quick_results_are_committed() -> None:
    # -quick files are smoke runs: .gitignore keeps them out, the renderer never reads them
    assert "benchmarks/results/*-quick.json" in (ROOT / ".gitignore").read_text()


def _fake_run(results_mod, device: str, measured: float, tmp_path: Path) -> Path:
    doc = "A fake benchmark.\n\nIt measures."
    argv = ["--x", "1", "--results-dir", str(tmp_path)]  # the folder is left out of the command
    r = results_mod.Results("bench_fake", doc, {"quick": False}, argv=argv, threads=2)
    r.data["device"] = device
    r.table(
        "main",
        [results_mod.Column("variant"), results_mod.Column("time", "ms"),
         results_mod.Column("ratio", "x")],
        [["a", 1.23456, 1.0], {"variant": "b", "time": 12345.6, "ratio": None}],
        title="Times",
    )  # fmt: skip
    r.goal("a is fast", measured=measured, threshold=1.05, passed=measured <= 1.05, unit="x")
    r.note("a note")
    return r.write(tmp_path)


def test_results_file_and_page_for_one_and_two_devices(results_mod, render_mod, tmp_path):
    path = _fake_run(results_mod, "cpu", 1.01, tmp_path)
    assert path.name == "bench_fake-cpu.json"
    data = json.loads(path.read_text())
    assert data["command"] == "python benchmarks/bench_fake.py --x 1"
    assert data["versions"]["python"] and data["versions"]["torch"]
    assert data["tables"][0]["rows"][1] == {"variant": "b", "time": 12345.6, "ratio": None}
    page = render_mod.render(tmp_path)
    assert "## A fake benchmark\n" in page
    assert "| variant | time (ms) | ratio |" in page
    assert "| a | 1.235 | 1.00× |" in page and "| b | 12,346 | — |" in page
    assert "| a is fast | 1.01× | ≤ 1.05× | **PASS** |" in page
    _fake_run(results_mod, "cuda-h100", 1.2, tmp_path)
    page = render_mod.render(tmp_path)
    assert "| goal | cpu | cuda-h100 |" in page  # goals side by side
    assert "1.01× (≤ 1.05×): **PASS**" in page and "1.20× (≤ 1.05×): **FAIL**" in page
    assert "**Times (cpu)**" in page and "**Times (cuda-h100)**" in page
    assert page.index("Run on **cpu**") < page.index("Run on **cuda-h100**")


def test_quick_runs_get_their_own_file_and_are_not_rendered(results_mod, render_mod, tmp_path):
    r = results_mod.Results("bench_fake", "Fake.", {"quick": True}, argv=[], threads=1)
    r.table("t", ["a"], [[1]])
    assert r.write(tmp_path).name == "bench_fake-cpu-quick.json"
    assert "## Fake\n" not in render_mod.render(tmp_path)


def test_incomplete_results_are_refused(results_mod, render_mod, tmp_path):
    path = _fake_run(results_mod, "cpu", 1.0, tmp_path)
    data = json.loads(path.read_text())
    del data["machine"]["cpu"], data["load_average"]
    data["tables"][0]["rows"][0]["extra"] = 1
    problems = results_mod.validate(data)
    assert "no machine.cpu" in problems and "no 'load_average'" in problems
    assert any("rows do not match" in p for p in problems)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no machine\.cpu"):
        render_mod.render(tmp_path)
    r = results_mod.Results("bench_fake", "Fake.", {}, argv=[], threads=1)
    with pytest.raises(ValueError, match="unknown columns"):
        r.table("t", ["a"], [{"b": 1}])


def test_device_labels_and_file_names(results_mod) -> None:
    assert results_mod.device_label("cpu") == "cpu"
    path = results_mod.results_path
    assert path("d", "bench_x", "cuda-h100", False) == Path("d/bench_x-cuda-h100.json")
    assert path("d", "bench_x", "cpu", True, "fp32") == Path("d/bench_x-cpu-fp32-quick.json")


def test_parts_of_one_script_share_its_section(results_mod, render_mod, tmp_path):
    for part in ("fp32", "bf16"):
        r = results_mod.Results("bench_fake", "Fake.", {}, argv=[], threads=1, part=part)
        r.table(f"t-{part}", ["a"], [[1]])
        r.goal(f"{part}: a goal", measured=1.0, threshold=2.0, passed=True)
        assert r.write(tmp_path).name == f"bench_fake-cpu-{part}.json"
    page = render_mod.render(tmp_path)
    assert page.count("## Fake\n") == 1
    assert "Run on **cpu bf16**" in page and "Run on **cpu fp32**" in page
    assert "| bf16: a goal |" in page and "| fp32: a goal |" in page


def test_docs_tables_are_what_the_renderer_makes_of_the_results(render_mod) -> None:
    pages = render_mod.render_docs(RESULTS, ROOT / "docs")
    assert {"mnist.md", "variants.md"} <= {p.name for p in pages}
    for page, (text, rendered) in pages.items():
        assert text == rendered, (
            f"{page.relative_to(ROOT)}: its results tables differ from the results files: run "
            "`python benchmarks/render_results.py` (never edit them by hand)"
        )


def test_a_docs_block_gets_the_table_and_where_it_comes_from(results_mod, render_mod, tmp_path):
    results = tmp_path / "results"
    _fake_run(results_mod, "cpu", 1.0, results)
    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "page.md"
    page.write_text(
        "Intro.\n\n<!-- results: bench_fake/main columns=variant,ratio -->\nstale\n"
        "<!-- /results -->\n\nAfter.\n"
    )
    ((text, rendered),) = render_mod.render_docs(results, docs).values()
    assert text == page.read_text() and "stale" not in rendered
    assert "| variant | ratio |\n|---|---:|\n| a | 1.00× |\n| b | — |\n" in rendered
    assert "`python benchmarks/bench_fake.py --x 1`" in rendered
    assert rendered.startswith("Intro.\n\n<!-- results:") and rendered.endswith("\n\nAfter.\n")
    assert render_mod.main(["--results-dir", str(results), "--docs-dir", str(docs),
                            "--output", str(tmp_path / "b.md")]) == 0  # fmt: skip
    assert page.read_text() == rendered
    page.write_text(rendered.replace("| a |", "| z |"))
    assert render_mod.main(["--results-dir", str(results), "--docs-dir", str(docs),
                            "--output", str(tmp_path / "b.md"), "--check"]) == 1  # fmt: skip
    page.write_text("<!-- results: bench_fake/nope -->\n<!-- /results -->\n")
    with pytest.raises(ValueError, match="no table 'nope'"):
        render_mod.render_docs(results, docs)
