"""The operations of the cross-product, each checked against an independent expectation.

Each operation takes the :class:`Setup` of a model cell and either returns (the numbers are
right), raises ``LoRAError`` (the library refuses: see ``refusals.py``), raises
:class:`NotApplicable` (the operation means nothing for this cell, e.g. requantizing a plain
weight) or raises ``AssertionError`` (wrong numbers). Anything else is a crash.

Tolerances (relative to the largest reference value, see :func:`check_close`): float32 2e-5
(layers of at most 72 inputs, a few float32 roundings per value); float64 1e-10; bfloat16 6e-2
(weights and inputs rounded to 8 significant bits, ~0.4% each, through two layers and a
tanh). Packed bases are compared through the weight they dequantize to, so no quantization
error enters a comparison, except for requantized merges (see :func:`op_merge_requantize`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import lora_param as lp

from .cells import ModelCell
from .formulas import LORA_FIRST, LORA_SECOND, VARIANTS, apply_formula
from .models import BNB_STORES, KINDS, _bnb_linear, bnb_dequantized, build_base, build_plain
from .reference import base_values, reference_model, reference_output, reference_values

__all__ = ["OPS", "NotApplicable", "Setup", "check_close", "make_setup"]

TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 6e-2}
#: Stores whose base forward is not ``x @ dequant(W)^T`` in the compute dtype: bitsandbytes'
#: LLM.int8 matmul casts the input to float16 and rounds each row to int8 too (steps of
#: absmax/127, ~0.4% of a row's largest value); measured up to 1.1e-2 relative error on the
#: outputs over the full product (OLoRA's large starts, requantized), 2.5e-3 typically.
STORE_TOL = {"bnb8": 2.5e-2}
PACKED = ("nf4", "int8", *BNB_STORES)


class NotApplicable(Exception):
    """The operation means nothing for this cell."""


def check_close(
    out: Tensor, ref: Tensor, what: str, dtype: torch.dtype | None = None, store: str = "plain"
) -> None:
    """``out`` equals ``ref`` to the tolerance of ``dtype`` (default: ``out``'s dtype) and of
    the base store."""
    tol = max(TOL[dtype or out.dtype], STORE_TOL.get(store, 0.0))
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
    err = (out.double() - ref.double()).abs().max().item()
    scale = max(ref.abs().max().item(), 1.0)
    if not err <= tol * scale:  # catches NaN too
        raise AssertionError(f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}")


def check_equal(out: Tensor, ref: Tensor, what: str) -> None:
    """Bit for bit."""
    if out.dtype != ref.dtype or out.shape != ref.shape or not torch.equal(out, ref):
        err = (out.double() - ref.double()).abs().max().item() if out.shape == ref.shape else None
        raise AssertionError(f"{what}: not bit for bit equal (max difference {err})")


def _no_grad_eval(model: nn.Module, x: Tensor, train: bool = False) -> Tensor:
    """The output without gradients, in eval mode (``train``: in training mode)."""
    model.train(train)
    with torch.no_grad():
        return model(x)


@dataclass
class Setup:
    """A model cell set up: its base model, its model with adapters, an input."""

    cell: ModelCell
    tmp: Path
    base: nn.Module = field(init=False)
    pristine: nn.Module = field(init=False)
    model: nn.Module = field(init=False)
    x: Tensor = field(init=False)

    # ---- building ---------------------------------------------------------------------------

    def start(self, seed: int = 0) -> nn.Module:
        """A fresh model before ``add_lora`` (nf4 is packed by add_lora(quantize=) itself).

        Seed 0: a copy of the base before it ever ran (bitsandbytes layers change their own
        state in their first forward); another seed: other base weights.
        """
        if self.cell.store == "nf4":
            return build_plain(self.cell.kind, seed)
        if seed:
            return build_base(self.cell.kind, self.cell.store, seed)
        return copy.deepcopy(self.pristine)

    def add(self, model: nn.Module, *, default_rank: int | None = None, only_default: bool = False):
        """The cell's add_lora calls (the variant's options from formulas.py)."""
        cell, spec = self.cell, KINDS[self.cell.kind]
        options = VARIANTS.get(cell.entry_variant)
        first = dict(LORA_FIRST if options is None else options.first)
        second = dict(LORA_SECOND if options is None else options.second)
        common: dict[str, Any] = {"mode": cell.mode}
        if cell.init != "kaiming":
            common["init"] = cell.init
        first = {"variant": cell.variant_name, **common, **first}
        second = {"variant": cell.variant_name, **common, **second}
        if default_rank is not None:
            first["rank"] = default_rank
        if cell.store == "nf4":
            first["quantize"] = "nf4"
        if cell.extra in ("head", "second_heads"):
            first["trainable"] = ["head"]
        if cell.extra == "bias":
            first["bias"] = "lora_only"
        if cell.extra == "bias_all":
            first["bias"] = "all"
        lp.add_lora(model, spec.targets, adapter="default", **first)
        if cell.second and not only_default:
            if cell.extra == "second_heads":
                second["trainable"] = ["head"]
            lp.add_lora(model, spec.targets, adapter="b", **second)
        return model

    def build(self) -> None:
        """Base, model (adapters randomized: every update non-zero, copies changed), input."""
        self.base = build_base(self.cell.kind, self.cell.store)
        self.pristine = copy.deepcopy(self.base)
        self.model = self.add(self.start())
        randomize(self.model, seed=1)
        self.x = KINDS[self.cell.kind].inputs(torch.Generator().manual_seed(123))

    # ---- expectations -----------------------------------------------------------------------

    def close(self, out: Tensor, ref: Tensor, what: str, dtype: torch.dtype | None = None) -> None:
        """``out`` equals ``ref`` to the tolerance of its dtype and of the cell's store."""
        check_close(out, ref, what, dtype, self.cell.store)

    def base_out(self, x: Tensor | None = None, *, train: bool = False) -> Tensor:
        """The base model's output (no grad).

        bitsandbytes' ``Linear4bit`` evaluates on the CPU through a repacked weight with
        bfloat16 block scales (its eval forward repacks the weight in place); its training
        forward is the one that computes with the weight as stored, as the adapted layer does.
        """
        base = self.base
        base.train(train or self.cell.store == "bnb4")
        with torch.no_grad():
            return base(self.x if x is None else x)

    def ref(
        self,
        model: nn.Module | None = None,
        active: Collection[str] | None = None,
        override: dict[str, Tensor] | None = None,
        x: Tensor | None = None,
    ) -> Tensor:
        """The reference output of ``model`` (default: the cell's) on ``x``."""
        return reference_output(
            self.pristine,
            self.model if model is None else model,
            self.cell,
            self.x if x is None else x,
            active,
            override,
        )

    @property
    def tensor(self) -> str:
        """Path of the adapted tensor."""
        return KINDS[self.cell.kind].tensor

    def adapters(self) -> list[str]:
        return ["default", "b"] if self.cell.second else ["default"]


def randomize(model: nn.Module, seed: int, std: float = 0.3) -> None:
    """Move every trainable tensor of every adapter (and every trained copy) off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, entry in lp.iter_entries(model):
            for t in entry.trainable_tensors().values():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * std)


def make_setup(cell: ModelCell, tmp: Path) -> Setup:
    s = Setup(cell, tmp)
    s.build()
    return s


# --------------------------------------------------------------------------- the operations


def op_add_lora(s: Setup) -> None:
    """add_lora itself: what trains is exactly the adapters' tensors and copies."""
    trainable = {id(p) for p in s.model.parameters() if p.requires_grad}
    owned = {id(t) for t in lp.adapter_parameters(s.model)}
    if trainable != owned:
        raise AssertionError(f"{len(trainable)} trainable tensors, adapters own {len(owned)}")
    if lp.list_adapters(s.model) != s.adapters():
        raise AssertionError(f"adapters {lp.list_adapters(s.model)}")


def op_forward(s: Setup) -> None:
    """Training forward == the formula; backward reaches every trainable tensor."""
    model = copy.deepcopy(s.model)
    model.train()
    out = model(s.x)
    s.close(out, s.ref(), "training forward")
    out.square().sum().backward()
    shadowed = _shadowed_copies(model)
    for name, p in model.named_parameters():
        if id(p) in shadowed:
            continue
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all()):
            raise AssertionError(f"no finite gradient for {name}")
    s.close(_no_grad_eval(model, s.x), s.ref(), "eval forward")


def _shadowed_copies(model: nn.Module) -> set[int]:
    """Copies another enabled adapter's later copy of the same tensor replaces (no gradient)."""
    last: dict[str, Tensor] = {}
    shadowed = set()
    for path, _, _, c in lp.iter_copies(model):
        if c.enabled:
            if path in last:
                shadowed.add(id(last[path]))
            last[path] = c.value
    return shadowed


def op_lora_off(s: Setup) -> None:
    """With the adapters disabled the model is the base model, bit for bit."""
    model = copy.deepcopy(s.model)
    with lp.lora_disabled(model):
        check_equal(_no_grad_eval(model, s.x), s.base_out(), "eval, lora off")
        model.train()
        with torch.no_grad():
            check_equal(model(s.x), s.base_out(train=True), "training, lora off")


def _plain_everywhere(model: nn.Module) -> None:
    left = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    if left:
        raise AssertionError(f"parametrizations left after merge on {left}")


def op_merge(s: Setup) -> None:
    """merge_lora == LoRA on; the result is a plain model."""
    model = copy.deepcopy(s.model)
    lp.merge_lora(model)
    if s.cell.store in ("plain", *BNB_STORES):
        _plain_everywhere(model)
    s.close(_no_grad_eval(model, s.x), s.ref(), "merged")


def _quantized_like(s: Setup, weight: Tensor) -> Tensor:
    """``weight`` packed the way the cell's store packs, read back (float32)."""
    if s.cell.store in ("nf4", "int8"):
        q = build_plain(s.cell.kind)
        owner, _, attr = s.tensor.rpartition(".")
        with torch.no_grad():
            getattr(q.get_submodule(owner), attr).copy_(weight)
        lp.quantize_base(q, [KINDS[s.cell.kind].targets[0]], method=s.cell.store)
        with torch.no_grad():
            return getattr(q.get_submodule(owner), attr).float()
    dense = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        dense.weight.copy_(weight)
    return bnb_dequantized(_bnb_linear(dense, s.cell.store), s.cell.store)


def _requantized_weight(s: Setup, model: nn.Module, active: Collection[str]) -> Tensor:
    """The packed weight a requantizing merge of ``active`` left, dequantized; checked against
    quantize(W') with W' from the formula."""
    want = _quantized_like(s, reference_values(s.pristine, s.model, s.cell, active)[s.tensor])
    owner, _, attr = s.tensor.rpartition(".")
    layer = model.get_submodule(owner)
    if s.cell.store in BNB_STORES:
        got = bnb_dequantized(layer, s.cell.store)
    else:
        with torch.no_grad(), lp.lora_disabled(model):
            got = getattr(layer, attr).float()
    # Rounding W' differently by 1e-7 may flip a code at a decision boundary: allow a few.
    off = (got - want).abs() > 1e-3 * want.abs().max()
    if off.float().mean() > 0.02:
        raise AssertionError(
            f"requantized weight differs from quantize(W') in {off.float().mean():.0%} of "
            f"its values (max {(got - want).abs().max():.3g})"
        )
    return got


def _requantize(model: nn.Module, adapter: str | None = None) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lp.merge_lora(model, adapter, requantize=True)
    if not any(issubclass(w.category, lp.RequantizationWarning) for w in caught):
        raise AssertionError("no RequantizationWarning")


def _ref_model_out(s: Setup, values: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return reference_model(values, s.cell)(s.x.double() if s.x.is_floating_point() else s.x)


def op_merge_requantize(s: Setup) -> None:
    """merge_lora(requantize=True) stores quantize(W') (W' from the formula), with a warning;
    with a second adapter, merging "default" alone keeps "b" on top of quantize(W')."""
    if s.cell.store not in PACKED:
        raise NotApplicable("a plain base is not requantized")
    model = copy.deepcopy(s.model)
    _requantize(model)
    got = _requantized_weight(s, model, s.adapters())
    ref = _ref_model_out(s, reference_values(s.pristine, s.model, s.cell, override={s.tensor: got}))
    # The bitsandbytes layer's own forward again: see Setup.base_out for its training mode.
    s.close(_no_grad_eval(model, s.x, s.cell.store == "bnb4"), ref, "requantized merge")
    if not s.cell.second:
        return
    model = copy.deepcopy(s.model)
    _requantize(model, "default")
    if lp.list_adapters(model) != ["b"]:
        raise AssertionError(f"adapters after merging 'default': {lp.list_adapters(model)}")
    got = _requantized_weight(s, model, ["default"])
    values = reference_values(s.pristine, s.model, s.cell, active={"b"}, under={s.tensor: got})
    s.close(_no_grad_eval(model, s.x), _ref_model_out(s, values), "'default' merged, 'b' on top")


def op_merge_adapter(s: Setup) -> None:
    """merge_lora(adapter="default") == LoRA on; the other adapter stays, switchable."""
    model = copy.deepcopy(s.model)
    lp.merge_lora(model, adapter="default")
    s.close(_no_grad_eval(model, s.x), s.ref(), "default merged")
    if s.cell.second:
        if lp.list_adapters(model) != ["b"]:
            raise AssertionError(f"adapters after merging 'default': {lp.list_adapters(model)}")
        with lp.lora_disabled(model):
            out = _no_grad_eval(model, s.x)
        s.close(out, s.ref(active={"default"}), "default merged, b disabled")
    elif lp.list_adapters(model):
        raise AssertionError(f"adapters left: {lp.list_adapters(model)}")


def op_remove(s: Setup) -> None:
    """remove_lora gives the base model back: outputs and state_dict bit for bit."""
    model = copy.deepcopy(s.model)
    lp.remove_lora(model)
    # The bitsandbytes layer's own forward again: see Setup.base_out for its training mode.
    check_equal(_no_grad_eval(model, s.x, s.cell.store == "bnb4"), s.base_out(), "removed")
    got, want = model.state_dict(), s.pristine.state_dict()
    if list(got) != list(want):
        raise AssertionError(f"state_dict keys {list(got)} != {list(want)}")
    for k, v in want.items():
        if isinstance(v, Tensor) and not torch.equal(got[k], v):
            raise AssertionError(f"state_dict[{k!r}] changed")
    if [n for n, _ in model.named_parameters()] != [n for n, _ in s.base.named_parameters()]:
        raise AssertionError("parameter order changed")


def op_save_load(s: Setup) -> None:
    """save_lora, then load_lora into a fresh base: the same outputs."""
    path = s.tmp / "adapter.pt"
    lp.save_lora(s.model, path)
    fresh = s.start()
    if s.cell.store == "nf4":
        lp.quantize_base(fresh, [KINDS[s.cell.kind].targets[0]], method="nf4")
    lp.load_lora(fresh, path, mode=s.cell.mode)
    check_equal(_no_grad_eval(fresh, s.x), _no_grad_eval(s.model, s.x), "loaded")
    s.close(_no_grad_eval(fresh, s.x), s.ref(), "loaded vs formula")


def op_peft_roundtrip(s: Setup) -> None:
    """export_peft, then import_peft into a fresh base: the adapter's outputs."""
    try:
        import safetensors  # noqa: F401
    except ImportError as exc:
        raise NotApplicable("safetensors is not installed") from exc
    folder = s.tmp / "peft"
    lp.export_peft(s.model, folder, adapter="default")
    fresh = s.start()
    if s.cell.store == "nf4":
        lp.quantize_base(fresh, [KINDS[s.cell.kind].targets[0]], method="nf4")
    lp.import_peft(fresh, folder, mode=s.cell.mode)
    s.close(_no_grad_eval(fresh, s.x), s.ref(active={"default"}), "PEFT round trip")


def _expected_cache_bytes(s: Setup) -> int:
    """One copy of the adapted weight; none for a packed base (never cached)."""
    if s.cell.store != "plain":
        return 0
    w = dict(s.pristine.named_parameters())[s.tensor]  # not the model's: a read with grad
    return w.numel() * w.element_size()  # enabled frees the cache


def op_eval_cache(s: Setup) -> None:
    """Every policy gives the formula's outputs; eval_cache_bytes is what the policy holds
    (0 for packed bases and for "never"); the cache follows in-place changes; a training
    forward frees it."""
    model = copy.deepcopy(s.model)
    ref = s.ref()
    for policy in ("always", "never", "auto"):
        lp.set_eval_cache(model, policy)
        out = _no_grad_eval(model, s.x)
        s.close(out, ref, f"eval, policy {policy!r}")
        want = 0 if policy == "never" else _expected_cache_bytes(s)
        got = lp.eval_cache_bytes(model)
        if got != want:
            raise AssertionError(
                f"eval_cache_bytes {got} after an eval forward, policy {policy!r}; expected {want}"
            )
        check_equal(_no_grad_eval(model, s.x), out, f"second eval forward, policy {policy!r}")
    lp.set_eval_cache(model, "always")
    _no_grad_eval(model, s.x)
    randomize(model, seed=5)  # in place: version counters move
    s.close(_no_grad_eval(model, s.x), s.ref(model), "eval after an in-place change")
    model.train()
    model(s.x).sum().backward()
    if lp.eval_cache_bytes(model):
        raise AssertionError("a training forward left the eval cache filled")


def _mixed_names(s: Setup) -> list[str]:
    return ["b", "default", "__base__"] if s.cell.second else ["default", "__base__", "default"]


def op_mixed_batch(s: Setup) -> None:
    """mixed_adapters: each row equals its adapter alone (heads and biases included); base
    rows are the base model bit for bit; with gradients too."""
    names = _mixed_names(s)
    model = copy.deepcopy(s.model)
    base_out = s.base_out()
    refs = {n: s.ref(active={n}) for n in set(names) - {"__base__"}}
    model.eval()
    with torch.no_grad(), lp.mixed_adapters(model, names):
        out = model(s.x)
    for i, n in enumerate(names):
        if n == "__base__":
            check_equal(out[i], base_out[i], f"row {i} (__base__)")
        else:
            s.close(out[i], refs[n][i], f"row {i} ({n})")
    model.train()
    with lp.mixed_adapters(model, names):
        out = model(s.x)
    out.square().sum().backward()
    base_train = s.base_out(train=True)
    for i, n in enumerate(names):
        s.close(
            out[i],
            base_train[i].double() if n == "__base__" else refs[n][i],
            f"training, row {i} ({n})",
        )


def _combined(s: Setup, weights: dict[str, float]) -> dict[str, Tensor]:
    """Expected tensors of the combined adapter: W + sum w_i (f_i(W) - W), the sources'
    trained copies carried over."""
    base = base_values(s.pristine, s.cell)
    w = base[s.tensor]
    total = w.clone()
    override = {}
    for path, _, _, e in lp.iter_entries(s.model):
        if e.adapter not in weights:
            continue
        if isinstance(e, lp.TrainableCopy):
            override[path] = e.value.detach().double()
        elif path == s.tensor:
            total += weights[e.adapter] * (apply_formula(e.variant, w, e) - w)
    override[s.tensor] = total
    return override


def _op_combine(s: Setup, method: str) -> None:
    model = copy.deepcopy(s.model)
    weights = {"default": 1.0, "b": -0.5} if s.cell.second else {"default": 0.5}
    kwargs = {"rank": 64} if method == "svd" else {}
    lp.combine_adapters(model, weights, "combo", method, **kwargs)
    lp.set_active_adapters(model, ["combo"])
    want = s.ref(active=(), override=_combined(s, weights))
    s.close(_no_grad_eval(model, s.x), want, f"combined ({method})")


def op_combine_cat(s: Setup) -> None:
    """combine_adapters(method="cat") == the weighted sum of the updates; heads carried."""
    _op_combine(s, "cat")


def op_combine_svd(s: Setup) -> None:
    """combine_adapters(method="svd") at full rank == the weighted sum of the updates."""
    _op_combine(s, "svd")


def op_hotswap(s: Setup) -> None:
    """prepare_hotswap, then hotswap_lora a file of another run (rank 2, its own heads and
    biases): the model computes what the file's model computes."""
    model = copy.deepcopy(s.model)
    lp.prepare_hotswap(model, max_rank=4)
    s.close(_no_grad_eval(model, s.x), s.ref(), "prepared")
    donor = s.add(s.start(), default_rank=2, only_default=True)
    randomize(donor, seed=9)
    path = s.tmp / "donor.pt"
    lp.save_lora(donor, path)
    lp.hotswap_lora(model, path)
    lp.set_active_adapters(model, ["default"])
    s.close(_no_grad_eval(model, s.x), s.ref(donor), "hot-swapped")


def op_deepcopy(s: Setup) -> None:
    """A deep copy computes the same, and changing or removing its adapters leaves the
    original alone."""
    before = _no_grad_eval(s.model, s.x)
    dup = copy.deepcopy(s.model)
    check_equal(_no_grad_eval(dup, s.x), before, "deep copy")
    randomize(dup, seed=3)
    lp.remove_lora(dup)
    check_equal(_no_grad_eval(s.model, s.x), before, "original after changing its copy")


def op_state_dict(s: Setup) -> None:
    """state_dict into a model set up the same way on other base weights: the same outputs.

    bitsandbytes' Linear4bit cannot load its quantization state through load_state_dict
    (without adapters either: its state_dict keys are unexpected keys): there the model is
    set up on the same base.
    """
    fresh = s.add(s.start(seed=0 if s.cell.store == "bnb4" else 1))
    fresh.load_state_dict(s.model.state_dict())
    check_equal(_no_grad_eval(fresh, s.x), _no_grad_eval(s.model, s.x), "state_dict loaded")


def op_load_base_state_dict(s: Setup) -> None:
    """load_base_state_dict(strict=True) of the base checkpoint (and of the plain float one
    for NF4/int8) changes nothing: copies are not base tensors."""
    model = copy.deepcopy(s.model)
    before = _no_grad_eval(s.model, s.x)
    lp.load_base_state_dict(model, s.pristine.state_dict(), strict=True)
    check_equal(_no_grad_eval(model, s.x), before, "base checkpoint loaded")
    if s.cell.store in ("nf4", "int8"):
        lp.load_base_state_dict(model, build_plain(s.cell.kind).state_dict(), strict=True)
        check_equal(_no_grad_eval(model, s.x), before, "plain checkpoint loaded")


def op_parameter_counts(s: Setup) -> None:
    """parameter_counts: base = the pretrained model's parameters (copies not counted)."""
    counts = lp.parameter_counts(s.model)
    base = sum(p.numel() for p in build_plain(s.cell.kind).parameters())
    lora = sum(t.numel() for t in lp.adapter_parameters(s.model))
    got = (counts.base, counts.lora, counts.trainable, counts.total)
    want = (base, lora, lora, base + lora)
    if got != want:
        raise AssertionError(f"(base, lora, trainable, total) = {got}, expected {want}")


def _cast(s: Setup, dtype: torch.dtype) -> None:
    # A packed base dequantizes in its own precision: the reference holds its float32 values.
    tol = torch.float32 if dtype == torch.float64 and s.cell.store != "plain" else dtype
    model = copy.deepcopy(s.model).to(dtype)
    x = s.x.to(dtype) if s.x.is_floating_point() else s.x
    model.train()
    out = model(x)
    if out.dtype != dtype:
        raise AssertionError(f"output dtype {out.dtype} after casting the model to {dtype}")
    s.close(out, s.ref(), f"training forward in {dtype}", tol)
    out.float().square().sum().backward()
    s.close(_no_grad_eval(model, x), s.ref(), f"eval forward in {dtype}", tol)
    merged = copy.deepcopy(model)
    lp.merge_lora(merged)
    s.close(_no_grad_eval(merged, x), s.ref(), f"merged in {dtype}", tol)


def op_double(s: Setup) -> None:
    """model.double(): forward, backward, eval and merge in float64."""
    _cast(s, torch.float64)


def op_bfloat16(s: Setup) -> None:
    """model.to(torch.bfloat16): forward, backward, eval and merge in bfloat16."""
    _cast(s, torch.bfloat16)


def op_compile(s: Setup) -> None:
    """torch.compile(backend="eager"): training and eval forwards == the formula."""
    # Every cell's Net.forward is a new compilation: past dynamo's recompile limit it would
    # silently run uncompiled.
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = copy.deepcopy(s.model)
    compiled = torch.compile(model, backend="eager")
    model.train()
    out = compiled(s.x)
    if not counters["stats"]["unique_graphs"]:
        raise AssertionError("torch.compile traced no graph")
    s.close(out, s.ref(), "compiled training forward")
    out.square().sum().backward()
    model.eval()
    with torch.no_grad():
        s.close(compiled(s.x), s.ref(), "compiled eval forward")


OPS: dict[str, Callable[[Setup], None]] = {
    name[3:]: f for name, f in list(globals().items()) if name.startswith("op_")
}
