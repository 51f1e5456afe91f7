#!/usr/bin/env python
"""LoRA and QLoRA at LLM scale: random-weight Hugging Face Llama, lora_param vs PEFT.

    python benchmarks/bench_llm.py                    # the 542 M Llama, bf16 and fp32
    python benchmarks/bench_llm.py --dtype bf16       # one dtype
    python benchmarks/bench_llm.py --quick            # smoke run (tiny Llama, one repeat)
    python benchmarks/bench_llm.py --markdown         # also print markdown tables (README)

Variants (all adapters rank 16 on the seven projections q/k/v/o/gate/up/down):
- training step (forward + backward + AdamW on the adapters, batch 2 x 256 tokens), with
  and without gradient checkpointing: ``base`` (no LoRA; the input embeddings require grad so
  backward runs through every layer), ``lora`` (ours), ``qlora-nf4`` / ``qlora-int8`` (ours,
  ``add_lora(quantize=...)``), ``peft``, ``peft-bnb-nf4`` (PEFT on bitsandbytes
  ``Linear4bit`` layers, where bitsandbytes runs);
- generation with LoRA on (batch 1, 32-token prompt, 32 new tokens, greedy, under no_grad):
  ``merged`` (plain weights), ``lora`` (ours, default eval-cache policy), ``lora-nf4``,
  ``peft``, and ``lora-cache-always`` (ours with ``set_eval_cache(model, "always")``: a
  ``W + s·B·A`` copy of every projection kept while generating, what the default ``"auto"``
  policy avoids on this model; its peak minus ``lora``'s is what that copy costs).

NF4 dequantization runs with the default ``kernel="auto"`` (bitsandbytes' compiled kernel
where it is installed); the ``*-nf4-torch`` rows force the pure-PyTorch kernel (what a user
without bitsandbytes gets).

bf16 on a CPU without native bf16 matmul (AVX2 only, e.g. AMD Zen 3): PyTorch's bf16
``grad @ W`` (the input gradient of every Linear) takes up to ~60x its forward product there
(pytorch/pytorch#146508), so one 542 M training step would take tens of minutes for every
variant. On such a CPU (``--matmul-fix auto``, the default) bf16 steps run under
``_cpu_bf16.FastReducedPrecisionMatmul``, which hands every reduced-precision CPU matmul its
operands in the fast memory order (one transient copy each, for every variant alike; the
header says when it is on).

Method
- memory: every (variant, phase) runs in its own fresh process (multiprocessing forkserver).
  "resident" = RSS after the model is built; "peak" = the RSS high-water mark during the
  steps (reset after the build through /proc/self/clear_refs). "stored" = bytes of the
  model's state_dict (parameters and buffers; packed tensors for quantized layers).
- time: all variants of a phase live in one process and are timed round-robin with a
  rotating start (``_bench_models.time_interleaved``); the figure is the median over repeats.
  The share of the CPU other processes used during the timed rounds is printed: on a shared
  machine the absolute times move, the ratios much less.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(1, str(HERE.parent))

import _bench_models as bm  # noqa: E402
import _cpu_bf16  # noqa: E402
import torch  # noqa: E402
from _results import Column, Goal, Results, add_results_argument  # noqa: E402
from torch import nn  # noqa: E402

import lora_param as lp  # noqa: E402

# deprecation notes from transformers / bitsandbytes would bury the tables
warnings.simplefilter("ignore", FutureWarning)
warnings.simplefilter("ignore", UserWarning)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
TRAIN_VARIANTS = (
    "base",
    "lora",
    "qlora-nf4",
    "qlora-nf4-torch",
    "qlora-int8",
    "peft",
    "peft-bnb-nf4",
)
GEN_VARIANTS = ("merged", "lora", "lora-cache-always", "lora-nf4", "lora-nf4-torch", "peft")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

#: Llama shapes. "542m": hidden 2048, 8 layers, full multi-head attention (32 KV heads),
#: MLP 5632, vocabulary 32,000, untied head: 542,121,984 parameters.
CONFIGS: dict[str, dict[str, int]] = {
    "542m": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 8,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
    "quick": {
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 1000,
    },
}

# Goals of issue 14.
NF4_BITS_GOAL = 4.2  # bits per parameter of an NF4 layer, packed codes and scales
RESIDENT_GOAL = 0.5  # stored model with every projection in NF4 vs the bf16 model
QLORA_SAVING_GOAL = (
    0.65  # step-peak saving vs bf16 LoRA, as a share of the packed layers' bf16 bytes
)
QLORA_TIME_GOAL = 2.0  # QLoRA step vs our bf16 LoRA step
EVAL_PEAK_GOAL = 1.05  # generation peak vs PEFT's (time: <= PEFT's)


# --------------------------------------------------------------------------- building


def _bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def build_base(cfg_name: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-weight LlamaForCausalLM built directly in ``dtype`` (no fp32 copy), frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIGS[cfg_name], tie_word_embeddings=False)
    config.eos_token_id = None  # generate exactly max_new_tokens
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    return model


def _peft_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=PROJECTIONS, lora_dropout=0.0)
    return get_peft_model(model, config)


def _bnb_nf4_projections(model: nn.Module, dtype: torch.dtype) -> None:
    """Swap every projection for a bitsandbytes NF4 ``Linear4bit`` (as BitsAndBytesConfig does)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=dtype,
            quant_type="nf4",
            compress_statistics=True,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            module.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
        ).to("cpu")
        setattr(parent, name.rsplit(".", 1)[-1], layer)
        del module


def build_variant(cfg_name: str, dtype: torch.dtype, variant: str) -> nn.Module:
    """Build one variant in place on a fresh base model."""
    model = build_base(cfg_name, dtype)
    targets = [f"*{p}" for p in PROJECTIONS]
    if variant == "base":
        return model
    if variant == "lora":
        return lp.add_lora(model, targets, rank=RANK)
    if variant == "lora-cache-always":
        model = lp.add_lora(model, targets, rank=RANK)
        lp.set_eval_cache(model, "always")
        return model
    if variant in ("qlora-nf4", "lora-nf4", "qlora-int8"):
        method = "int8" if variant.endswith("int8") else "nf4"
        return lp.add_lora(model, targets, rank=RANK, quantize=method)
    if variant in ("qlora-nf4-torch", "lora-nf4-torch"):
        lp.quantize_base(model, targets, method="nf4", kernel="torch")
        return lp.add_lora(model, targets, rank=RANK)
    if variant == "merged":
        return lp.merge_lora(lp.add_lora(model, targets, rank=RANK))
    if variant == "peft":
        return _peft_lora(model)
    if variant == "peft-bnb-nf4":
        if not _bnb_available():
            raise RuntimeError("bitsandbytes is not installed (pip install bitsandbytes)")
        _bnb_nf4_projections(model, dtype)
        return _peft_lora(model)
    raise ValueError(f"unknown variant {variant!r}")


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the state_dict's tensors, each storage counted once."""
    seen: dict[tuple[int, int], int] = {}
    for value in model.state_dict().values():
        if isinstance(value, torch.Tensor):
            key = (value.data_ptr(), value.numel())
            seen[key] = value.numel() * value.element_size()
    return sum(seen.values())


def projection_numel(model: nn.Module) -> int:
    """Elements of the seven projections' weights (what QLoRA stores packed)."""
    return sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in PROJECTIONS and hasattr(m, "in_features")
    )


# --------------------------------------------------------------------------- steps


def token_batch(cfg_name: str, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIGS[cfg_name]["vocab_size"], (batch, seq), generator=g)


class TrainStep:
    """forward + backward + AdamW on the trainable parameters (the input embeddings for base)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, checkpointing: bool) -> None:
        self.model, self.ids, self.checkpointing = model, ids, checkpointing
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None

    def __call__(self) -> None:
        model = self.model
        if self.checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        elif getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        model.train()
        if self.opt is None:
            embeds = model.get_input_embeddings()(self.ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=self.ids).loss
        else:
            loss = model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


class GenerateStep:
    """Greedy generation of ``new_tokens`` tokens with LoRA on, under no_grad."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> None:
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens

    def __call__(self) -> torch.Tensor:
        self.model.config.use_cache = True
        self.model.eval()
        with torch.no_grad():
            return self.model.generate(
                self.prompt,
                max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )


def make_step(model: nn.Module, phase: str, args: argparse.Namespace) -> Callable[[], Any]:
    if phase == "generate":
        return GenerateStep(model, token_batch(args.config, 1, args.prompt), args.new_tokens)
    ids = token_batch(args.config, args.batch, args.seq)
    return TrainStep(model, ids, checkpointing=phase == "train-gc")


def matmul_fix_applies(args: argparse.Namespace, dtype_name: str) -> bool:
    """Whether bf16 matmuls run under _cpu_bf16.FastReducedPrecisionMatmul (see the docstring)."""
    if dtype_name != "bf16" or args.matmul_fix == "off":
        return False
    return args.matmul_fix == "on" or _cpu_bf16.cpu_lacks_bf16_matmul()


def matmul_fix(args: argparse.Namespace, dtype_name: str) -> contextlib.AbstractContextManager:
    if matmul_fix_applies(args, dtype_name):
        return _cpu_bf16.FastReducedPrecisionMatmul()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- memory


def memory_worker(
    args: argparse.Namespace, dtype_name: str, variant: str, phase: str, conn
) -> None:
    """In a fresh process: build one variant, run the phase's steps, send the RSS figures."""
    try:
        torch.set_num_threads(args.threads)
        model = build_variant(args.config, DTYPES[dtype_name], variant)
        step = make_step(model, phase, args)
        gc.collect()
        resident = bm.rss_bytes() or bm.maxrss_bytes()
        bm.reset_peak_rss()
        with matmul_fix(args, dtype_name):
            for _ in range(args.mem_steps):
                step()
        conn.send(
            {
                "resident": resident,
                "peak": bm.maxrss_bytes(),
                "stored": stored_bytes(model),
                "projection_numel": projection_numel(model),
            }
        )
    except BaseException as e:  # reported by the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def measure_memory(args: argparse.Namespace, dtype_name: str, plan, log) -> dict:
    """{(phase, variant): figures} from one fresh process each."""
    ctx = mp.get_context("forkserver")
    paths = [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # RSS follows live memory
    ctx.set_forkserver_preload(["torch", "_bench_models", "transformers", "lora_param"])
    out = {}
    for phase, variants in plan:
        for variant in variants:
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=memory_worker, args=(args, dtype_name, variant, phase, child))
            proc.start()
            child.close()
            try:
                msg = parent.recv()
            except EOFError:
                msg = {"error": "worker died"}
            proc.join()
            if "error" in msg:
                log(f"  memory {dtype_name}/{phase}/{variant}: not measured: {msg['error']}")
                continue
            out[(phase, variant)] = msg
            figures = ", ".join(f"{k} {_mb(msg[k])} MB" for k in ("resident", "peak", "stored"))
            log(f"  memory {dtype_name}/{phase}/{variant}: {figures}")
    return out


# --------------------------------------------------------------------------- timing


def measure_time(args: argparse.Namespace, dtype_name: str, plan, log) -> dict:
    """{(phase, variant): median seconds}, all variants of a phase interleaved in this process."""
    torch.set_num_threads(args.threads)
    out: dict = {}
    for phases, variants in plan:
        models = {}
        for variant in variants:
            try:
                models[variant] = build_variant(args.config, DTYPES[dtype_name], variant)
            except Exception as e:  # a variant that cannot run here
                log(f"  time {dtype_name}/{variant}: not measured: {type(e).__name__}: {e}")
        fns = {(phase, v): make_step(m, phase, args) for phase in phases for v, m in models.items()}
        stats: dict = {}
        with matmul_fix(args, dtype_name):
            timings = bm.time_interleaved(
                {f"{p}/{v}": fn for (p, v), fn in fns.items()},
                repeats=args.repeats,
                warmup=args.warmup,
                target_block_s=0.0,
                busy_threshold=1.01,  # a shared machine is never quiet: keep every round, say so
                max_wait_s=0.0,
                stats=stats,
            )
        for key, t in timings.items():
            phase, variant = key.split("/", 1)
            out[(phase, variant)] = t.median
            log(f"  time {dtype_name}/{key}: {t.median:.3f} s")
        log(f"  {dtype_name} {'+'.join(phases)}: others used {stats['others_mean']:.0%} of the CPU")
        out[("others", "+".join(phases))] = stats["others_mean"]
        del models, fns
        gc.collect()
    return out


# --------------------------------------------------------------------------- report


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _goal(ok: bool | None, text: str) -> str:
    return f"{'n/a ' if ok is None else 'PASS' if ok else 'FAIL'} {text}"


REFS = {"train": "lora", "train-gc": "lora", "generate": "peft"}
RESULT_COLUMNS = [
    Column("phase"),
    Column("variant"),
    Column("time", "s", ".3f"),
    Column("vs ref", "x"),
    Column("resident", "MB", ",.0f"),
    Column("peak", "MB", ",.0f"),
    Column("stored", "MB", ",.0f"),
]


def _measured(mem: dict, times: dict):
    """(phase, variant, figures, seconds, reference seconds) for every measured row."""
    for phase in ("train", "train-gc", "generate"):
        variants = GEN_VARIANTS if phase == "generate" else TRAIN_VARIANTS
        for v in variants:
            m, t = mem.get((phase, v), {}), times.get((phase, v))
            if m or t is not None:
                yield phase, v, m, t, times.get((phase, REFS[phase]))


def raw_rows(mem: dict, times: dict) -> list[list]:
    """The report's rows as numbers (seconds, ratio, MB), for the results file."""

    def mib(x: float | None) -> float | None:
        return None if x is None else x / 2**20

    return [
        [phase, v, t, None if t is None or not ref else t / ref,
         mib(m.get("resident")), mib(m.get("peak")), mib(m.get("stored"))]
        for phase, v, m, t, ref in _measured(mem, times)
    ]  # fmt: skip


def report(dtype_name: str, mem: dict, times: dict, args: argparse.Namespace) -> list[str]:
    lines = [f"\n## {args.config} Llama, {dtype_name}"]
    rows = [("phase", "variant", "time s", "vs ref", "resident MB", "peak MB", "stored MB")]
    for phase, v, m, t, ref in _measured(mem, times):
        rows.append(
            (
                phase,
                v,
                "-" if t is None else f"{t:.3f}",
                _ratio(t, ref),
                _mb(m.get("resident")),
                _mb(m.get("peak")),
                _mb(m.get("stored")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if args.markdown:
        lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines += ["time 'vs ref': training steps vs our LoRA's, generation vs PEFT's", ""]
    return lines


def goals(mem: dict, times: dict, dtype: torch.dtype, total_numel: int) -> list[Goal]:
    """The goals of issue 14 (passed None, printed "n/a", where a figure is missing)."""

    def get(phase: str, variant: str, key: str) -> float | None:
        return mem.get((phase, variant), {}).get(key)

    out = []
    phase_of_stored = "train" if get("train", "lora", "stored") else "generate"
    lora = get(phase_of_stored, "lora", "stored")
    nf4 = get(phase_of_stored, "qlora-nf4" if phase_of_stored == "train" else "lora-nf4", "stored")
    numel = get(phase_of_stored, "lora", "projection_numel")
    packed = None
    if lora and nf4 and numel:
        packed = nf4 - lora + numel * dtype.itemsize  # the projections' packed bytes
        bits = 8 * packed / numel
        out.append(
            Goal(bits <= NF4_BITS_GOAL, f"NF4 layers: {bits:.3f} bits/param (<= 4.2)",
                 "NF4 layers: bits per parameter (codes and scales)", bits, NF4_BITS_GOAL)
        )  # fmt: skip
        # embeddings and head stay in the model's dtype: compare with the bf16 model
        share = nf4 / (2 * total_numel) if dtype == torch.bfloat16 else None
        if share is not None:
            out.append(
                Goal(share <= RESIDENT_GOAL, f"stored NF4 model {share:.2f}x bf16 (<= 0.5x)",
                     "stored model, every projection NF4, vs the bf16 model", share,
                     RESIDENT_GOAL, "x")
            )  # fmt: skip
    else:
        out.append(
            Goal(None, "NF4 bits/param (qlora-nf4 or lora not measured)",
                 "NF4 layers: bits per parameter (codes and scales)", None, NF4_BITS_GOAL)
        )  # fmt: skip
    for phase in ("train", "train-gc"):
        for variant in ("qlora-nf4", "qlora-nf4-torch"):
            out += _qlora_goals(phase, variant, mem, times, dtype, numel, packed)
    peak_o, peak_p = get("generate", "lora", "peak"), get("generate", "peft", "peak")
    if peak_o and peak_p:
        out.append(
            Goal(
                peak_o <= EVAL_PEAK_GOAL * peak_p,
                f"generate peak ours {peak_o / peak_p:.3f}x PEFT's (<= 1.05x)",
                "generation with LoRA on: peak RSS, ours vs PEFT's",
                peak_o / peak_p,
                EVAL_PEAK_GOAL,
                "x",
            )
        )
    t_o, t_p = times.get(("generate", "lora")), times.get(("generate", "peft"))
    if t_o and t_p:
        out.append(
            Goal(t_o <= t_p, f"generate time ours {t_o / t_p:.2f}x PEFT's (<= 1.00x)",
                 "generation with LoRA on: time, ours vs PEFT's", t_o / t_p, 1.0, "x")
        )  # fmt: skip
    return out


def cache_cost(mem: dict) -> str | None:
    """What caching every projection's ``W + s·B·A`` adds to the generation peak (a line)."""
    always = mem.get(("generate", "lora-cache-always"), {}).get("peak")
    auto = mem.get(("generate", "lora"), {}).get("peak")
    peft = mem.get(("generate", "peft"), {}).get("peak")
    if not (always and auto):
        return None
    line = (
        f"generate: the eval cache kept for every projection (set_eval_cache 'always') peaks "
        f"{(always - auto) / 2**20:+,.0f} MB above the default 'auto' policy"
    )
    if peft:
        line += f" ({(always - peft) / 2**20:+,.0f} MB above PEFT's)"
    return line


def _qlora_goals(
    phase: str,
    variant: str,
    mem: dict,
    times: dict,
    dtype: torch.dtype,
    numel: int | None,
    packed: float | None,
) -> list[Goal]:
    """The QLoRA step goals: peak memory saved vs our LoRA step, and time within 2x.

    The memory goal is stated for bf16: saved >= 0.65 of the packed layers' bf16 bytes. Where
    the run is fp32, the same figures are printed as what the step holds beyond the packed
    weights ("overhead": the dequantized temporaries), next to what the bf16 goal allows.
    """
    out = []
    peak_l = mem.get((phase, "lora"), {}).get("peak")
    peak_q = mem.get((phase, variant), {}).get("peak")
    if peak_l and peak_q and numel and packed:
        saved = peak_l - peak_q
        share = saved / (dtype.itemsize * numel)
        overhead = dtype.itemsize * numel - packed - saved
        text = (
            f"{phase}: {variant} step peak below LoRA's by {share:.2f} of the packed layers' "
            f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} bytes; held beyond the packed "
            f"weights {overhead / 2**20:,.0f} MB"
        )
        if dtype == torch.bfloat16:
            out.append(
                Goal(share >= QLORA_SAVING_GOAL, text + " (goal: share >= 0.65)",
                     f"{phase}: {variant} step peak saved vs LoRA's, share of the packed "
                     "layers' bf16 bytes", share, QLORA_SAVING_GOAL, "", ">=")
            )  # fmt: skip
        else:
            allowed = (2 - 2 * QLORA_SAVING_GOAL) * numel - packed
            out.append(
                Goal(None, text + f" (the bf16 goal allows {allowed / 2**20:,.0f} MB)",
                     f"{phase}: {variant} step: held beyond the packed weights (the goal is "
                     "stated for bf16)", overhead / 2**20, allowed / 2**20, "MB")
            )  # fmt: skip
    t_l, t_q = times.get((phase, "lora")), times.get((phase, variant))
    if t_l and t_q:
        out.append(
            Goal(t_q <= QLORA_TIME_GOAL * t_l, f"{phase}: {variant} step {t_q / t_l:.2f}x ours",
                 f"{phase}: {variant} step time vs our LoRA step", t_q / t_l, QLORA_TIME_GOAL,
                 "x")
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="542m")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--quick", action="store_true", help="tiny Llama, one repeat (smoke run)")
    parser.add_argument("--phases", nargs="+", default=["train", "train-gc", "generate"])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(set(TRAIN_VARIANTS + GEN_VARIANTS)),
        help="only these variants (default: all); time-boxed runs on a busy machine",
    )
    parser.add_argument("--no-time", action="store_true", help="memory only")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--mem-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="timing only")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--matmul-fix",
        choices=["auto", "on", "off"],
        default="auto",
        help="bf16 CPU matmuls in the fast operand order (auto: on CPUs without native bf16)",
    )
    add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.repeats, args.mem_steps, args.warmup = "quick", 1, 1, 0
        args.seq, args.prompt, args.new_tokens = 32, 8, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    train_phases = [p for p in args.phases if p.startswith("train")]
    print(f"# bench_llm: {args.config} Llama, rank {RANK} on {', '.join(PROJECTIONS)}")
    print(f"# {bm_machine(args.threads)}")
    if any(matmul_fix_applies(args, d) for d in args.dtype):
        print(
            "# bf16: this CPU has no native bf16 matmul; bf16 steps run under "
            "_cpu_bf16.FastReducedPrecisionMatmul (operands copied into the fast order)"
        )
    setting = (
        f"training batch {args.batch}x{args.seq}; generation batch 1, prompt {args.prompt}, "
        f"{args.new_tokens} new tokens; {args.repeats} timed repeats"
    )
    print(f"# {setting}")
    chosen = set(args.variants or TRAIN_VARIANTS + GEN_VARIANTS)
    train_variants = [
        v for v in TRAIN_VARIANTS if v in chosen and (v != "peft-bnb-nf4" or _bnb_available())
    ]
    gen_variants = [v for v in GEN_VARIANTS if v in chosen]
    for dtype_name in args.dtype:
        t0 = time.perf_counter()
        # one results file per dtype (their runs take very different times)
        record = Results("bench_llm", __doc__, args, argv=argv, threads=args.threads,
                         packages=("transformers", "peft", "bitsandbytes"), part=dtype_name)
        record.note(f"{args.config} Llama, rank {RANK} on {', '.join(PROJECTIONS)}; {setting}")
        plan = [("generate", gen_variants)] if "generate" in args.phases else []
        plan += [(p, train_variants) for p in train_phases]
        mem = {} if args.no_memory else measure_memory(args, dtype_name, plan, log)
        time_plan = [(["generate"], gen_variants)] if "generate" in args.phases else []
        if train_phases:
            time_plan.append((train_phases, train_variants))
        times = {} if args.no_time else measure_time(args, dtype_name, time_plan, log)
        print("\n".join(report(dtype_name, mem, times, args)))
        found = goals(mem, times, DTYPES[dtype_name], build_base_meta(args.config))
        print("\n".join(_goal(g.passed, g.text) for g in found))
        cost = cache_cost(mem)
        if cost:
            print(cost)
            record.note(f"{dtype_name}: {cost}")
        log(f"  {dtype_name}: {time.perf_counter() - t0:.0f} s")
        fix = " (bf16 matmuls under the CPU fix)" if matmul_fix_applies(args, dtype_name) else ""
        record.table(
            f"llm-{dtype_name}",
            RESULT_COLUMNS,
            raw_rows(mem, times),
            title=f"{args.config} Llama, {dtype_name}{fix}: time 'vs ref' is against our LoRA "
            "step for training, PEFT's for generation",
        )
        for key, share in times.items():
            if key[0] == "others":
                record.note(f"{dtype_name} {key[1]}: other processes used {share:.0%} of the CPU")
        record.add_goals(
            g._replace(description=f"{dtype_name}: {g.description}") for g in found
        )
        record.write(args.results_dir)
    return 0


def build_base_meta(cfg_name: str) -> int:
    """Parameter count of the config, built on the meta device (no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[cfg_name], tie_word_embeddings=False))
    return sum(p.numel() for p in model.parameters())


def bm_machine(threads: int) -> str:
    import platform

    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    import transformers

    peft = "-"
    with contextlib.suppress(ImportError):
        import peft as _peft

        peft = _peft.__version__
    return (
        f"CPU {cpu}, {os.cpu_count()} cores, torch threads {threads}, load average {load}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft}"
    )


if __name__ == "__main__":
    sys.exit(main())
