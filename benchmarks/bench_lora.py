#!/usr/bin/env python
"""Side-by-side LoRA benchmark: lora_param (factored / materialized) vs PEFT vs merged vs frozen base.

    python benchmarks/bench_lora.py                  # everything (~10 min on a 2-core CPU)
    python benchmarks/bench_lora.py --quick          # smoke run (smaller models, few repeats)
    python benchmarks/bench_lora.py --models mlp     # choose models: mlp transformer resnet
    python benchmarks/bench_lora.py --markdown       # also print a markdown table (README)

Method
- time: all variants of one model live in this process; each repeat times one block of
  calls of every variant, round-robin with a rotating start; reported figure = median over
  repeats of the per-call time in a block (after warm-up). A round during which other
  processes used more than 10% of the machine's CPU (/proc/stat) is thrown away and rerun
  once the machine is quiet again; the summary line says how many were.
- memory: every (variant, phase) runs in its own fresh process (multiprocessing
  forkserver, so all workers start from the same imported modules; each builds its model in
  place, no second copy). "RSS" = the OS's max RSS (getrusage ru_maxrss) after the steps
  (whole process life, build included); "Δ" = what the steps added on top of the built
  model: the RSS high-water mark is reset after the build (/proc/self/clear_refs) and Δ =
  ru_maxrss after the steps minus RSS after the build. Workers run glibc with a fixed mmap
  threshold (MALLOC_MMAP_THRESHOLD_=131072) so RSS follows live memory: with glibc's dynamic
  threshold freed tensors linger in the heap and identical runs differ by ~25 MB on the
  transformer (--default-malloc measures that way).
- training step = forward + backward + AdamW step on the trainable (adapter) parameters;
  the frozen base has no trainable parameters, its input requires grad instead so backward
  still runs through every layer (the floor of any LoRA training step).
- evaluation = model.eval() and torch.no_grad(), one batch per call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(1, str(HERE.parent))

import _bench_models as bm  # noqa: E402
import torch  # noqa: E402
from _results import Column, Goal, Results, add_results_argument  # noqa: E402

EVAL_GOAL = 1.05  # eval with LoRA on must be <= 1.05x the merged model
MEM_TOL = 2**20  # memory goals: sub-MB RSS differences are allocator bookkeeping, not the library
BUSY_THRESHOLD = 0.10  # a timing round with other processes above this CPU share is rerun


# --------------------------------------------------------------------------- settings


_REPEATS: int | None = None  # --repeats
_MAX_WAIT: float | None = None  # --max-wait


def settings(quick: bool, family: str) -> dict:
    st = _settings(quick, family)
    if _REPEATS:
        st["repeats"] = _REPEATS
    if _MAX_WAIT is not None:
        st["max_wait_s"] = _MAX_WAIT
    return st


_KEYS = (
    "repeats",
    "warmup",
    "block_s",
    "max_wait_s",
    "mem_repeats",
    "mem_train_steps",
    "mem_eval_steps",
)
_SETTINGS = {
    # timing: rounds, warm-up calls, seconds per timed block, longest wait for a quiet machine;
    # memory: runs per figure, train steps, eval steps
    "quick": (3, 1, 0.02, 1.0, 1, 2, 2),
    "mlp": (25, 5, 0.25, 60.0, 1, 5, 5),
    "transformer": (7, 1, 0.0, 60.0, 1, 3, 3),
    "resnet": (11, 2, 0.3, 60.0, 1, 3, 3),
}


def _settings(quick: bool, family: str) -> dict:
    return dict(zip(_KEYS, _SETTINGS["quick" if quick else family], strict=True))


def machine_info(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    parts = [
        f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {threads}",
        f"python {platform.python_version()}, torch {torch.__version__}",
    ]
    with contextlib.suppress(Exception):
        import psutil

        parts.append(f"RAM {psutil.virtual_memory().total / 2**30:.1f} GiB")
    if bm.HAVE_PEFT:
        parts.append(f"peft {bm._peft.__version__}")
    if bm.HAVE_TV:
        parts.append(f"torchvision {bm.torchvision.__version__}")
    if bm.HAVE_OURS:
        parts.append(f"lora_param {getattr(bm._lp, '__version__', '?')}")
    else:
        parts.append("lora_param: add_lora not importable, its variants are skipped")
    return "; ".join(parts)


# --------------------------------------------------------------------------- memory


def measure_memory(
    specs, variants_for, quick: bool, threads: int, log, fixed_malloc: bool = True
) -> dict:
    """{(spec.key, variant, phase): (peak, delta, trainable)} from fresh processes."""
    ctx = mp.get_context("forkserver")
    # The forkserver process does not get this process's sys.path, only its environment: put
    # benchmarks/ (and the checkout) on PYTHONPATH so it can preload _bench_models (torch,
    # peft, torchvision, lora_param) once; every worker is then a cheap fork of it.
    paths = [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if fixed_malloc:
        # glibc raises its mmap threshold after the first large free, after which freed
        # tensors may stay in the heap: RSS then depends on heap history and identical runs
        # differ by tens of MB. A fixed threshold returns every freed tensor to the OS, so
        # RSS follows live memory and the figures repeat to the MB.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    ctx.set_forkserver_preload(["torch", "_bench_models"])
    runs: dict = {}
    for spec in specs:
        st = settings(quick, spec.family)
        for _ in range(st["mem_repeats"]):
            for phase, variants in (
                ("train", variants_for["train"]),
                ("eval", variants_for["eval"]),
            ):
                for v in variants:
                    steps = st["mem_train_steps"] if phase == "train" else st["mem_eval_steps"]
                    msg = _memory_run(ctx, spec, v, phase, steps, threads)
                    if msg[0] != "ok":
                        log(f"  memory {spec.key}/{v}/{phase}: FAILED: {msg[1]}")
                        continue
                    runs.setdefault((spec.key, v, phase), []).append(msg[1:])
    # allocator noise: peak RSS of identical runs differs by tens of MB; report the median
    res = {}
    for key, xs in runs.items():
        peaks, deltas = [x[0] for x in xs], [x[1] for x in xs]
        res[key] = (statistics.median(peaks), statistics.median(deltas), xs[0][2], peaks, deltas)
    return res


def _memory_run(ctx, spec, variant, phase, steps, threads):
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=bm.memory_worker, args=(spec, variant, phase, steps, threads, child))
    p.start()
    child.close()
    try:
        msg = parent.recv()
    except EOFError:
        p.join()
        msg = ("error", f"worker died (exit code {p.exitcode})", 0, 0)
    p.join()
    return msg


# --------------------------------------------------------------------------- timing + checks


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_spec(spec, train_variants, eval_variants, quick: bool, log) -> dict:
    st = settings(quick, spec.family)
    t0 = time.perf_counter()
    base = spec.build_base()
    models = {}
    for v in dict.fromkeys(train_variants + eval_variants):
        if v == "materialized+cached":
            continue
        models[v] = bm.build_variant(spec, v, base)
    if "materialized+cached" in eval_variants:
        models["materialized+cached"] = models["materialized"]
    x, y = spec.make_batch()
    out: dict = {"spec": spec.key, "desc": spec.desc, "rank": spec.rank, "checks": {}}
    out["trainable"] = {v: bm.trainable_count(m) for v, m in models.items()}

    # -- outputs equal? (eval, no_grad, same adapter values everywhere)
    for m in models.values():
        m.eval()
    ref = None
    if "merged" in models:
        with torch.no_grad():
            ref = models["merged"](x)
        for v, m in models.items():
            if v in ("merged", "base"):
                continue
            with torch.no_grad(), bm.block_context(v):
                out["checks"][f"{v} eval == merged"] = rel_diff(m(x), ref)
        with torch.no_grad():
            out["checks"]["base eval vs merged (LoRA effect)"] = rel_diff(models["base"](x), ref)

    # -- training step
    for v in train_variants:
        models[v].train()
    steps = {v: bm.TrainStep(spec, models[v], (x, y)) for v in train_variants}
    out["rounds"] = {"train": {}, "eval": {}}
    tt = bm.time_interleaved(
        steps,
        repeats=st["repeats"],
        warmup=st["warmup"],
        target_block_s=st["block_s"],
        busy_threshold=BUSY_THRESHOLD,
        max_wait_s=st["max_wait_s"],
        stats=out["rounds"]["train"],
    )
    out["train"] = {v: t.__dict__ for v, t in tt.items()}
    log(f"  {spec.key}: train timed ({time.perf_counter() - t0:.0f}s) {out['rounds']['train']}")

    # -- evaluation
    for m in models.values():
        m.eval()
    evals = {v: bm.EvalStep(models[v], x) for v in eval_variants}
    contexts = {v: (lambda v=v: bm.block_context(v)) for v in eval_variants}
    te = bm.time_interleaved(
        evals,
        repeats=st["repeats"],
        warmup=st["warmup"],
        target_block_s=st["block_s"],
        contexts=contexts,
        busy_threshold=BUSY_THRESHOLD,
        max_wait_s=st["max_wait_s"],
        stats=out["rounds"]["eval"],
    )
    out["eval"] = {v: t.__dict__ for v, t in te.items()}
    log(f"  {spec.key}: eval timed ({time.perf_counter() - t0:.0f}s) {out['rounds']['eval']}")

    # -- a cached/merged eval weight must follow the adapters: one more optimizer step,
    #    then no_grad eval output vs a grad-mode forward (which never uses an eval cache)
    for v in train_variants:
        if v == "base":
            continue
        m = models[v]
        m.eval()
        with torch.no_grad():
            m(x)  # fill any eval cache
        m.train()
        steps[v]()
        steps[v]()
        m.eval()
        with torch.no_grad():
            fast = m(x)
        with torch.enable_grad():
            slow = m(x).detach()
        out["checks"][f"{v} eval after optimizer step == grad-mode forward"] = rel_diff(fast, slow)
    return out


# --------------------------------------------------------------------------- report


def fmt_ms(s):
    return (
        "—"
        if s is None
        else (f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}")
    )


def fmt_x(a, b):
    return "—" if a is None or b is None or not b else f"{a / b:.2f}×"


def fmt_mb(b):
    return "—" if b is None else f"{b / 2**20:.0f}"


def build_rows(results, mem) -> list[list[str]]:
    rows = []
    for r in results:
        key = r["spec"]
        tr = {v: d["median"] for v, d in r["train"].items()}
        ev = {v: d["median"] for v, d in r["eval"].items()}
        for v in dict.fromkeys(list(r["eval"]) + list(r["train"])):
            mt = mem.get((key, v, "train"))
            me = mem.get((key, v, "eval"))
            rows.append(
                [
                    key,
                    v,
                    f"{r['trainable'].get(v, 0):,}" if v in r["trainable"] else "—",
                    fmt_ms(tr.get(v)),
                    fmt_x(tr.get(v), tr.get("base")) if v in tr else "—",
                    fmt_x(tr.get(v), tr.get("peft")) if v in tr else "—",
                    fmt_ms(ev.get(v)),
                    fmt_x(ev.get(v), ev.get("merged")) if v in ev else "—",
                    fmt_mb(mt[0]) if mt else "—",
                    fmt_mb(mt[1]) if mt else "—",
                    fmt_mb(me[0]) if me else "—",
                    fmt_mb(me[1]) if me else "—",
                ]
            )
    return rows


def _ms(s):
    return None if s is None else s * 1e3


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


def _mib(b):
    return None if b is None else b / 2**20


RESULT_COLUMNS = [
    Column("model"),
    Column("variant"),
    Column("trainable"),
    Column("train", "ms"),
    Column("train vs base", "x"),
    Column("train vs PEFT", "x"),
    Column("eval", "ms"),
    Column("eval vs merged", "x"),
    Column("train RSS", "MB", ",.0f"),
    Column("train Δ", "MB", ",.0f"),
    Column("eval RSS", "MB", ",.0f"),
    Column("eval Δ", "MB", ",.0f"),
]


def build_raw_rows(results, mem) -> list[list]:
    """The table's values as numbers (ms, ratios, MB), for the results file."""
    rows = []
    for r in results:
        key = r["spec"]
        tr = {v: d["median"] for v, d in r["train"].items()}
        ev = {v: d["median"] for v, d in r["eval"].items()}
        for v in dict.fromkeys(list(r["eval"]) + list(r["train"])):
            mt = mem.get((key, v, "train"))
            me = mem.get((key, v, "eval"))
            rows.append(
                [
                    key,
                    v,
                    r["trainable"].get(v),
                    _ms(tr.get(v)),
                    _ratio(tr.get(v), tr.get("base")),
                    _ratio(tr.get(v), tr.get("peft")),
                    _ms(ev.get(v)),
                    _ratio(ev.get(v), ev.get("merged")),
                    _mib(mt[0]) if mt else None,
                    _mib(mt[1]) if mt else None,
                    _mib(me[0]) if me else None,
                    _mib(me[1]) if me else None,
                ]
            )
    return rows


HEADER = [
    "model",
    "variant",
    "trainable",
    "train ms",
    "vs base",
    "vs PEFT",
    "eval ms",
    "vs merged",
    "train RSS MB",
    "train Δ MB",
    "eval RSS MB",
    "eval Δ MB",
]


def text_table(rows) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    line = lambda cells: "  ".join(
        c.rjust(w[i]) if i > 1 else c.ljust(w[i]) for i, c in enumerate(cells)
    )
    out = [line(HEADER), "  ".join("-" * x for x in w)]
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            out.append("")
        out.append(line(r))
        prev = r[0]
    return "\n".join(out)


def markdown_table(rows) -> str:
    out = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADER) - 2)) + "|",
    ]
    for r in rows:
        out.append("| " + " | ".join(r) + " |")
    return "\n".join(out)


def _mb1(b):
    return f"{b / 2**20:.1f}"


def _range(xs):
    return f"{min(xs) / 2**20:.0f}-{max(xs) / 2**20:.0f}"


def goals(results, mem) -> list[Goal]:
    """One Goal per goal. Time verdicts are strict (a note says when a miss is within the IQR);
    memory verdicts allow MEM_TOL (1 MB)."""
    lines = []
    for r in results:
        key = r["spec"]
        tr, ev = r["train"], r["eval"]
        if "factored" in tr and "peft" in tr:
            f, p = tr["factored"], tr["peft"]
            ratio = f["median"] / p["median"]
            noise = max(f["q3"] - f["q1"], p["q3"] - p["q1"]) / p["median"]
            note = "; a tie: the miss is within the IQR" if ratio > 1 and ratio - 1 <= noise else ""
            lines.append(
                Goal(
                    f["median"] <= p["median"],
                    (
                        f"{key}: train step factored {fmt_ms(f['median'])} ms <= PEFT {fmt_ms(p['median'])} ms "
                        f"({ratio:.3f}×, IQR ±{noise * 100:.0f}%{note})"
                    ),
                    f"{key}: training step, factored vs PEFT",
                    ratio,
                    1.0,
                    "x",
                )
            )
        mf, mp_ = mem.get((key, "factored", "train")), mem.get((key, "peft", "train"))
        if mf and mp_:
            for i, what in ((0, "train peak RSS"), (1, "train RSS added by the steps (Δ)")):
                diff = mf[i] - mp_[i]
                note = f" (+{diff / 2**20:.1f} MB: within the 1 MB tolerance)" if diff > 0 else ""
                if len(mf[i + 3]) > 1:
                    note += (
                        f" [median of {len(mf[i + 3])} runs; factored {_range(mf[i + 3])}, "
                        f"PEFT {_range(mp_[i + 3])}]"
                    )
                lines.append(
                    Goal(
                        diff <= MEM_TOL,
                        f"{key}: {what} factored {_mb1(mf[i])} MB <= PEFT {_mb1(mp_[i])} MB{note}",
                        f"{key}: {what}, factored vs PEFT's + 1 MB",
                        mf[i] / 2**20,
                        (mp_[i] + MEM_TOL) / 2**20,
                        "MB",
                    )
                )
        if "factored" in ev and "merged" in ev:
            f, m = ev["factored"]["median"], ev["merged"]["median"]
            lines.append(
                Goal(
                    f <= EVAL_GOAL * m,
                    f"{key}: eval factored {fmt_ms(f)} ms <= {EVAL_GOAL}× merged {fmt_ms(m)} ms ({f / m:.3f}×)",
                    f"{key}: evaluation with LoRA on (factored) vs merged",
                    f / m,
                    EVAL_GOAL,
                    "x",
                )
            )
    return lines


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: smaller models, few repeats")
    ap.add_argument(
        "--models",
        nargs="+",
        choices=["mlp", "transformer", "resnet"],
        default=["mlp", "transformer", "resnet"],
    )
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    ap.add_argument("--repeats", type=int, default=None, help="override repeats per variant")
    ap.add_argument(
        "--max-wait",
        type=float,
        default=None,
        help="longest wait (s) for a quiet machine before a timing round (default 60; a busy "
        "shared machine is never quiet: a small value keeps the run short, the summary says "
        "how busy it was)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-process memory runs")
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="memory runs with glibc's default (dynamic) mmap threshold: noisier RSS figures",
    )
    ap.add_argument("--json", type=Path, default=None, help="write raw results to this file")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a goal FAILs")
    add_results_argument(ap)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    record = Results(
        "bench_lora", __doc__, args, argv=argv, threads=args.threads,
        packages=("peft", "torchvision"),
    )  # fmt: skip
    print(
        f"# lora_param benchmark{' (--quick: reduced sizes, few repeats; not for reporting)' if args.quick else ''}"
    )
    print(machine_info(args.threads))

    train_variants = [v for v in bm.TRAIN_VARIANTS if bm.variant_available(v)]
    eval_variants = [v for v in bm.EVAL_VARIANTS if bm.variant_available(v)]
    all_specs = bm.make_specs(args.quick)
    specs = [s for fam in args.models for s in all_specs[fam]]
    global _REPEATS, _MAX_WAIT
    _REPEATS, _MAX_WAIT = args.repeats, args.max_wait
    for s in specs:
        print(f"- {s.key}: {s.desc}, LoRA rank {s.rank}")
    print("variants: " + "; ".join(f"{v} = {bm.VARIANT_HELP[v]}" for v in eval_variants))

    mem = {}
    if not args.no_memory:
        log("memory: one fresh process per (model, variant, phase) ...")
        mem = measure_memory(
            specs,
            {"train": train_variants, "eval": eval_variants},
            args.quick,
            args.threads,
            log,
            fixed_malloc=not args.default_malloc,
        )
        log(f"memory done ({time.perf_counter() - t_start:.0f}s)")

    cpu0 = bm.cpu_snapshot()
    results = []
    for s in specs:
        log(f"timing {s.key} ...")
        results.append(run_spec(s, train_variants, eval_variants, args.quick, log))

    rows = build_rows(results, mem)
    print()
    print(
        "times: median ms per call (train = fwd+bwd+AdamW step; eval = no_grad forward); "
        "RSS: ru_maxrss of a fresh process after the steps; Δ: what the steps added over the built model "
        "(peak during the steps minus RSS after the build)"
    )
    print(text_table(rows))

    print("\nconsistency (max |out - ref| / max |ref|; ~1e-6 is float rounding):")
    peft_mismatch = False
    checks = []
    for r in results:
        for name, d in r["checks"].items():
            flag = "" if "LoRA effect" in name else ("  ok" if d < 1e-4 else "  MISMATCH")
            peft_mismatch |= flag == "  MISMATCH" and name.startswith("peft")
            print(f"  {r['spec']}: {name}: {d:.2e}{flag}")
            checks.append([r["spec"], name, d, flag.strip() or "—"])
    if peft_mismatch:
        print(
            "  note: PEFT's LoRA lives in forward(); code that reads .weight directly without calling the\n"
            "  layer (nn.TransformerEncoderLayer's eval fast path) computes the base model instead."
        )

    print("\ngoals:")
    g = goals(results, mem)
    for ok, text, *_ in g:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    if not g:
        print("  (none checkable: lora_param's add_lora or peft missing)")

    if args.markdown:
        print("\nmarkdown:\n")
        print(markdown_table(rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine_info(args.threads),
                    "results": results,
                    "memory": {"/".join(k): v for k, v in mem.items()},
                },
                indent=1,
                default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o),
            )
        )
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    others = bm.others_cpu_share(cpu0, bm.cpu_snapshot())
    rounds = [r["rounds"][ph] for r in results for ph in ("train", "eval")]
    kept, dropped = sum(x["kept"] for x in rounds), sum(x["discarded"] for x in rounds)
    worst = max((x["others_max"] for x in rounds), default=0.0)
    if others is not None:
        busy = (
            f"other processes used {others * 100:.0f}% of the machine's CPU during the timing phase; "
            f"timing rounds kept {kept}, thrown away and rerun {dropped} (other processes > "
            f"{BUSY_THRESHOLD * 100:.0f}% CPU); worst kept round: {worst * 100:.0f}%"
        )
        print(busy)
        record.note(busy)
        if worst > BUSY_THRESHOLD:
            warning = "WARNING: the machine was not idle; timings are not reliable (rerun on an idle machine)"
            print(warning)
            record.note(warning)

    record.note(
        "times: median ms per call (train = forward + backward + AdamW step; eval = no_grad "
        "forward); RSS: ru_maxrss of a fresh process after the steps; Δ: what the steps added "
        "over the built model"
    )
    for s in specs:
        record.note(f"{s.key}: {s.desc}, LoRA rank {s.rank}")
    record.table("timings", RESULT_COLUMNS, build_raw_rows(results, mem), title="Time and memory")
    record.table(
        "consistency",
        [Column("model"), Column("check"), Column("max rel. diff", fmt=".2e"), Column("verdict")],
        checks,
        title="Outputs against the merged model (max |out - ref| / max |ref|)",
    )
    record.add_goals(g)
    record.write(args.results_dir)
    return 1 if args.strict and not all(goal.passed for goal in g) else 0


if __name__ == "__main__":
    sys.exit(main())
