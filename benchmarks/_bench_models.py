"""Model builders, variants and measurement primitives shared by ``bench_lora.py``.

Everything here is deterministic given a seed, so the timing process and the
memory worker processes build bit-identical models.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import resource
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

# --------------------------------------------------------------------------- optional deps

try:  # our library (the thing being measured)
    import lora_param as _lp

    HAVE_OURS = hasattr(_lp, "add_lora") and hasattr(_lp, "merge_lora")
except ImportError:  # pragma: no cover - only before the core exists
    _lp = None
    HAVE_OURS = False

try:
    import peft as _peft
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer as _PeftLoraLayer

    HAVE_PEFT = True
except ImportError:  # pragma: no cover - peft is the `bench` extra
    _peft = None
    HAVE_PEFT = False

try:
    import torchvision

    HAVE_TV = True
except ImportError:  # pragma: no cover
    torchvision = None
    HAVE_TV = False


# --------------------------------------------------------------------------- variants

#: variants timed for the training step (in this order)
TRAIN_VARIANTS = ("base", "factored", "materialized", "peft")
#: variants timed for evaluation (in this order)
EVAL_VARIANTS = ("merged", "base", "factored", "materialized", "materialized+cached", "peft")

VARIANT_HELP = {
    "base": "frozen base model, no LoRA (the floor; train = forward + backward to the input)",
    "factored": 'lora_param add_lora(mode="factored") (the default)',
    "materialized": 'lora_param add_lora(mode="materialized") (plain parametrization)',
    "materialized+cached": 'mode="materialized", eval block run inside parametrize.cached()',
    "peft": "PEFT LoRA (get_peft_model)",
    "merged": "lora_param merge_lora(): plain weights W + s*B@A, no LoRA",
}


def variant_available(variant: str) -> bool:
    if variant in ("factored", "materialized", "materialized+cached"):
        return HAVE_OURS
    if variant == "peft":
        return HAVE_PEFT
    if variant == "merged":
        return HAVE_OURS or HAVE_PEFT
    return True


# --------------------------------------------------------------------------- model specs


class MLP(nn.Module):
    """The MNIST MLP of the parametrize LoRA tutorial: 784-1000-2000-10, ReLU."""

    def __init__(self, hidden1: int = 1000, hidden2: int = 2000):
        super().__init__()
        self.linear1 = nn.Linear(28 * 28, hidden1)
        self.linear2 = nn.Linear(hidden1, hidden2)
        self.linear3 = nn.Linear(hidden2, 10)
        self.relu = nn.ReLU()

    def forward(self, img):
        x = img.view(-1, 28 * 28)
        x = self.relu(self.linear1(x))
        x = self.relu(self.linear2(x))
        return self.linear3(x)


@dataclass
class Spec:
    """One benchmark configuration (a model at one batch size)."""

    key: str  # e.g. "mlp-b10"
    family: str  # mlp | transformer | resnet
    desc: str  # human readable
    rank: int
    params: dict[str, Any] = field(default_factory=dict)

    # ---- building ----------------------------------------------------------------------
    def build_base(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        p = self.params
        if self.family == "mlp":
            m = MLP()
        elif self.family == "transformer":
            layer = nn.TransformerEncoderLayer(
                p["d_model"], p["nhead"], p["ffn"], dropout=0.1, batch_first=True
            )
            m = nn.TransformerEncoder(layer, p["layers"], enable_nested_tensor=False)
            # TransformerEncoder deep-copies the layer: re-init so layers differ
            for mod in m.modules():
                if isinstance(mod, nn.Linear):
                    mod.reset_parameters()
                if isinstance(mod, nn.MultiheadAttention):
                    mod._reset_parameters()
        elif self.family == "resnet":
            if not HAVE_TV:
                raise RuntimeError(
                    "torchvision is needed for the resnet benchmark (pip install .[bench])"
                )
            m = torchvision.models.resnet18(weights=None)
        else:  # pragma: no cover
            raise ValueError(self.family)
        for prm in m.parameters():
            prm.requires_grad_(False)
        return m

    def make_batch(self, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        p = self.params
        b = p["batch"]
        if self.family == "mlp":
            return torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)
        if self.family == "transformer":
            x = torch.randn(b, p["seq"], p["d_model"], generator=g)
            return x, torch.randn(b, p["seq"], p["d_model"], generator=g)
        if self.family == "resnet":
            hw = p["hw"]
            return torch.randn(b, 3, hw, hw, generator=g), torch.randint(0, 1000, (b,), generator=g)
        raise ValueError(self.family)  # pragma: no cover

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.family == "transformer":
            return F.mse_loss(out, y)
        return F.cross_entropy(out, y)

    # ---- which tensors get LoRA -------------------------------------------------------
    def ours_targets(self, base: nn.Module):
        """Targets for lora_param.add_lora (explicit, so every library adapts the same tensors)."""
        if self.family == "transformer":
            t = []
            for i in range(self.params["layers"]):
                t += [
                    f"layers.{i}.self_attn.in_proj_weight",
                    f"layers.{i}.self_attn.out_proj",
                    f"layers.{i}.linear1",
                    f"layers.{i}.linear2",
                ]
            return t
        return [n for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def peft_targets(self, base: nn.Module) -> list[str]:
        if self.family == "transformer":
            # PEFT's nn.MultiheadAttention support adapts in_proj_weight and out_proj together
            return ["self_attn", "linear1", "linear2"]
        return [n for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def make_specs(quick: bool = False) -> dict[str, list[Spec]]:
    """Benchmark configurations per model family. ``quick`` shrinks the big models (smoke run)."""
    tf = {"d_model": 768, "nhead": 12, "ffn": 3072, "layers": 4, "batch": 8, "seq": 128}
    rn = {"batch": 16, "hw": 64}
    if quick:
        tf.update(layers=2, batch=2, seq=16)
        rn.update(batch=2, hw=32)
    return {
        "mlp": [
            Spec("mlp-b10", "mlp", "MLP 784-1000-2000-10, batch 10", 1, {"batch": 10}),
            Spec("mlp-b256", "mlp", "MLP 784-1000-2000-10, batch 256", 1, {"batch": 256}),
        ],
        "transformer": [
            Spec(
                "transformer",
                "transformer",
                f"TransformerEncoder {tf['layers']}x(d{tf['d_model']}, {tf['nhead']}h, FFN {tf['ffn']}), "
                f"batch {tf['batch']}x{tf['seq']} tokens",
                8,
                tf,
            )
        ],
        "resnet": [
            Spec(
                "resnet18",
                "resnet",
                f"resnet18, batch {rn['batch']} at {rn['hw']}x{rn['hw']}",
                4,
                rn,
            )
        ],
    }


# --------------------------------------------------------------------------- adapter values


def _adapter_values(
    path: str, rank: int, fan_in: int, fan_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic non-zero A (rank, fan_in) and B (fan_out, rank) keyed by tensor path.

    B is non-zero so LoRA changes the outputs (the consistency checks then mean something).
    """
    g = torch.Generator().manual_seed(zlib.crc32(path.encode()))
    a = torch.randn(rank, fan_in, generator=g) / math.sqrt(fan_in)
    b = torch.randn(fan_out, rank, generator=g) * 0.05
    return a, b


@torch.no_grad()
def fill_ours(model: nn.Module) -> None:
    for path, _mod, _name, p in _lp.iter_lora(model):
        a, b = _adapter_values(path, p.rank, p.lora_A.shape[1], p.lora_B.shape[0])
        p.lora_A.copy_(a.reshape(p.lora_A.shape))
        p.lora_B.copy_(b.reshape(p.lora_B.shape))


@torch.no_grad()
def fill_peft(model: nn.Module, adapter: str = "default") -> int:
    """Give PEFT's A/B the same values as ours (same tensor path -> same values). Returns #layers."""
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, _PeftLoraLayer) or adapter not in getattr(mod, "lora_A", {}):
            continue
        path = name.removeprefix("base_model.model.").replace(".base_layer", "")
        is_mha = type(mod).__name__ == "MultiheadAttention"
        path += ".in_proj_weight" if is_mha else ".weight"
        wa = mod.lora_A[adapter].weight
        wb = mod.lora_B[adapter].weight
        rank = wa.shape[0]
        fan_in = wa[0].numel()
        fan_out = wb.shape[0]
        a, b = _adapter_values(path, rank, fan_in, fan_out)
        wa.copy_(a.reshape(wa.shape))
        wb.copy_(b.reshape(wb.shape))
        n += 1
    return n


# --------------------------------------------------------------------------- build variants


def build_variant(
    spec: Spec, variant: str, base: nn.Module | None = None, seed: int = 0, inplace: bool = False
) -> nn.Module:
    """Build one variant from a copy of a frozen base model (or from ``base`` itself: ``inplace``)."""
    if base is None:
        base, inplace = spec.build_base(seed), True
    model = base if inplace else copy.deepcopy(base)
    if variant == "base":
        return model
    if variant in ("factored", "materialized", "materialized+cached"):
        mode = "factored" if variant == "factored" else "materialized"
        _lp.add_lora(model, spec.ours_targets(model), rank=spec.rank, mode=mode)
        fill_ours(model)
        return model
    if variant == "merged":
        if HAVE_OURS:
            _lp.add_lora(model, spec.ours_targets(model), rank=spec.rank)
            fill_ours(model)
            return _lp.merge_lora(model)
        # before the core exists: PEFT's merge gives the same plain model
        return build_variant(spec, "peft", model, inplace=True).merge_and_unload()
    if variant == "peft":
        cfg = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.rank,
            target_modules=spec.peft_targets(model),
            lora_dropout=0.0,
            bias="none",
        )
        pm = get_peft_model(model, cfg)
        fill_peft(pm)
        return pm
    raise ValueError(f"unknown variant {variant!r}")


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- steps


class TrainStep:
    """forward + backward + optimizer step on the trainable (adapter) parameters.

    For the frozen base (nothing trainable) the input requires grad instead, so backward
    still runs through every layer: the floor any LoRA training step must pay.
    """

    def __init__(self, spec: Spec, model: nn.Module, batch):
        self.spec, self.model = spec, model
        self.x, self.y = batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None
        if not self.params:
            self.x = self.x.clone().requires_grad_(True)

    def __call__(self):
        out = self.model(self.x)
        loss = self.spec.loss(out, self.y)
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            self.x.grad = None


class EvalStep:
    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x = model, x

    def __call__(self):
        with torch.no_grad():
            return self.model(self.x)


def block_context(variant: str):
    """Context held around a timed block of eval calls (one 'evaluation pass')."""
    if variant == "materialized+cached":
        return parametrize.cached()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    median: float  # seconds per call
    q1: float
    q3: float
    samples: list[float]
    block: int  # calls per timed block

    @property
    def spread(self) -> float:
        """Relative inter-quartile range."""
        return (self.q3 - self.q1) / self.median if self.median else 0.0


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return min(xs), max(xs)
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def cpu_snapshot():
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process) or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def others_cpu_share(a, b) -> float | None:
    """Fraction of the machine's CPU time used by other processes between two snapshots."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    others = (b[1] - a[1]) - (b[2] - a[2])
    return max(0.0, others / ((b[0] - a[0]) * (os.cpu_count() or 1)))


def wait_until_quiet(threshold: float, max_wait_s: float, window_s: float = 0.5) -> bool:
    """Sleep until other processes use at most ``threshold`` of the CPU for one window.

    Returns False if that did not happen within ``max_wait_s`` (or cannot be measured).
    """
    deadline = time.perf_counter() + max_wait_s
    while True:
        a = cpu_snapshot()
        time.sleep(window_s)
        share = others_cpu_share(a, cpu_snapshot())
        if share is None:
            return False
        if share <= threshold:
            return True
        if time.perf_counter() > deadline:
            return False


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int,
    target_block_s: float,
    contexts: dict[str, Callable[[], Any]] | None = None,
    busy_threshold: float = 0.10,
    max_discards: int | None = None,
    max_wait_s: float = 60.0,
    stats: dict | None = None,
) -> dict[str, Timing]:
    """Round-robin timing in one process: every round times one block of each variant.

    The start of the round-robin rotates each round, so no variant always runs first (or
    right after the same neighbour). All variants use the same block length (calls per
    timed block), picked from the median single-call time so a block lasts ~target_block_s.
    A round during which other processes used more than ``busy_threshold`` of the machine's
    CPU (from /proc/stat) is thrown away and run again, at most ``max_discards`` times
    (default: ``2 * repeats``), after waiting (sleeping, up to ``max_wait_s`` each time) for
    the machine to be quiet; the same wait precedes warm-up. Counts go to ``stats``.
    """
    contexts = contexts or {}
    ctx = lambda n: contexts.get(n, contextlib.nullcontext)()
    waited = time.perf_counter()
    wait_until_quiet(busy_threshold, max_wait_s)
    waited = time.perf_counter() - waited
    max_discards = 2 * repeats if max_discards is None else max_discards
    names = list(fns)
    one = {}
    for n in names:
        with ctx(n):
            for _ in range(warmup):
                fns[n]()
            best = math.inf
            for _ in range(3 if warmup else 1):  # min: robust to a busy machine
                t0 = time.perf_counter()
                fns[n]()
                best = min(best, time.perf_counter() - t0)
            one[n] = best
    block = max(1, round(target_block_s / max(statistics.median(one.values()), 1e-7)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    discarded, shares = 0, []
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        r = 0
        while len(samples[names[0]]) < repeats:
            k = r % len(names)
            r += 1
            snap0 = cpu_snapshot()
            got = {}
            for n in names[k:] + names[:k]:
                with ctx(n):
                    t0 = time.perf_counter()
                    for _ in range(block):
                        fns[n]()
                    got[n] = (time.perf_counter() - t0) / block
            share = others_cpu_share(snap0, cpu_snapshot())
            if share is not None and share > busy_threshold and discarded < max_discards:
                discarded += 1
                t0 = time.perf_counter()
                wait_until_quiet(busy_threshold, max_wait_s)
                waited += time.perf_counter() - t0
                continue
            shares.append(share or 0.0)
            for n, t in got.items():
                samples[n].append(t)
    finally:
        if gc_was:
            gc.enable()
    if stats is not None:
        stats.update(
            discarded=discarded,
            kept=len(shares),
            others_max=max(shares, default=0.0),
            others_mean=statistics.fmean(shares) if shares else 0.0,
            block=block,
            waited_s=round(waited, 1),
        )
    out = {}
    for n, xs in samples.items():
        q1, q3 = _quartiles(xs)
        out[n] = Timing(statistics.median(xs), q1, q3, xs, block)
    return out


# --------------------------------------------------------------------------- memory worker


def maxrss_bytes() -> int:
    """The RSS high-water mark: Linux's VmHWM (which ``reset_peak_rss`` resets), else ru_maxrss.

    Not ru_maxrss on Linux: it also keeps the peak of threads that have exited (torch's worker
    threads), which resetting VmHWM does not clear, so a delta after a reset would read 0.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


def rss_bytes() -> int | None:
    """Current resident set size (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (what ru_maxrss reports) to the current RSS.

    Linux >= 4.0: write 5 to /proc/self/clear_refs. Returns False where that is unavailable.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    cur = rss_bytes()
    return cur is not None and maxrss_bytes() <= cur + (1 << 20)


def memory_worker(spec: Spec, variant: str, phase: str, steps: int, threads: int, conn) -> None:
    """Run in a fresh process: build one variant, then `steps` train or eval steps.

    Sends back ("ok", peak, delta, trainable count): ``peak`` is ru_maxrss at the end (the
    whole life of the process, model build included); ``delta`` is what the steps added on top
    of the built model: the high-water mark is reset after the build (when the OS allows;
    otherwise delta is measured against ru_maxrss after the build, a lower bound).
    """
    try:
        torch.set_num_threads(threads)
        model = build_variant(spec, variant)  # built in place: no second copy of the base
        batch = spec.make_batch()
        gc.collect()
        build_peak = maxrss_bytes()
        baseline = rss_bytes() if reset_peak_rss() else build_peak
        if phase == "train":
            model.train()
            step = TrainStep(spec, model, batch)
            for _ in range(steps):
                step()
        else:
            model.eval()
            step = EvalStep(model, batch[0])
            with block_context(variant):
                for _ in range(steps):
                    step()
        steps_peak = maxrss_bytes()
        conn.send(
            ("ok", max(build_peak, steps_peak), steps_peak - baseline, trainable_count(model))
        )
    except BaseException as e:  # noqa: BLE001  # pragma: no cover - reported by the parent
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 0, 0))
    finally:
        conn.close()
