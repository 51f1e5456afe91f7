"""``add_lora``: find the target layers by name and register an adapter on each, atomically."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..variants.dora import DoRAParametrization
from ..variants.experts import ExpertLayout, ExpertLoRAParametrization, is_experts_module
from ..variants.lora import Init, LoRAParametrization
from .copies import drop_copies, plan_copies, register_copies
from .distributed import is_sharded
from .errors import LoRAError
from .forward import factored_forward_applies, install_factored_forward
from .freeze import Bias, freeze_base, trainable_modules
from .generated_class import own_class
from .hf_save import guard_save_pretrained
from .lookup import list_adapters
from .matching import Pattern, Targets, as_patterns, is_literal, matches, nearest, pick
from .merge import drop_adapters
from .targets import (
    SUPPORTED_LAYERS,
    AdaptTarget,
    base_tensor,
    join,
    module_targets,
    parameter_target,
    tensor_names,
)

__all__ = ["Mode", "add_lora", "find_targets", "inject"]

Mode = Literal["factored", "materialized"]
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules of the user's model, without the ones parametrize adds."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if ".parametrizations" not in f".{n}" and not isinstance(m, LoRAParametrization)
    ]


def _tensor_paths(modules: list[tuple[str, nn.Module]]) -> dict[str, tuple[str, nn.Module, str]]:
    return {join(n, t): (n, m, t) for n, m in modules for t in tensor_names(m)}


def _unsupported(name: str, module: nn.Module) -> LoRAError:
    cls = parametrize.type_before_parametrizations(module).__name__
    if next(module.children(), None) is not None:
        hint = f"To adapt the layers inside it, use the glob '{join(name, '*')}'."
    else:
        hint = (
            "To adapt one of its parameters as a matrix, name it explicitly, e.g. "
            f"'{join(name, 'weight')}'."
        )
    return LoRAError(
        f"'{name}' is a {cls}, which LoRA does not support as a layer (supported: "
        f"{SUPPORTED_LAYERS}). {hint}"
    )


def find_targets(
    model: nn.Module,
    targets: Targets = None,
    *,
    exclude: Targets = None,
    layer_types: type | Sequence[type] | None = None,
    expert_layout: ExpertLayout | None = None,
) -> list[AdaptTarget]:
    """Resolve target patterns to the tensors that will carry LoRA, checking every pattern.

    A pattern is matched against module names and against tensor paths
    (``"<module>.<parameter>"``). A supported layer whose name matches is adapted as that
    layer. A tensor whose path matches is adapted on its own (a 2-D matrix, or per expert
    when 3-D) unless its owning module's name matches too: then the module decides (adapted
    as a layer when supported, skipped otherwise), so ``"*"`` means "every supported layer".
    Tensors reached by a pattern that cannot carry LoRA (1-D, integer) are skipped, and so are
    3-D tensors outside an experts block (a position table) and tensors of 4+ dimensions
    outside a supported layer; a literal path adapts or rejects any tensor.

    Args:
        model: The model to search.
        targets: None for every supported layer; a glob (full match of the qualified module
            name or tensor path), a list of globs, a compiled regex (full match), or a callable
            ``(name, module) -> bool`` (for a tensor path, ``module`` is its owner). A literal
            parameter path adapts that parameter.
        exclude: Patterns (same forms) removing matches, by module name or tensor path.
        layer_types: Only modules (or tensors owned by modules) of these types match.
        expert_layout: Layout of 3-D expert tensors, ``"out_in"`` or ``"in_out"``; None
            follows each experts module's ``is_transposed`` flag.

    Returns:
        The targets, in model order, each tensor once.

    Raises:
        LoRAError: A pattern matches nothing adaptable, a layer named explicitly is not
            supported, or a named parameter cannot carry LoRA.
    """
    types = _layer_types(layer_types)
    modules = _candidates(model)
    by_name = dict(modules)
    tensors = _tensor_paths(modules)
    found: dict[str, AdaptTarget] = {}

    def add_module(name: str, module: nn.Module, explicit: bool) -> bool:
        if types and not isinstance(module, types):
            return False
        adapted = module_targets(name, module, expert_layout)
        if adapted is None:
            if explicit:
                raise _unsupported(name, module)
            return False
        found.update((t.path, t) for t in adapted)
        return True

    def add_tensors(pattern: Pattern) -> bool:
        hit = False
        for path, (module_name, module, tensor) in tensors.items():
            if types and not isinstance(module, types):
                continue
            if matches(pattern, module_name, module) or not matches(pattern, path, module):
                continue
            if _can_carry_lora(base_tensor(module, tensor)):
                target = parameter_target(module_name, module, tensor, expert_layout)
                if _reachable_by_pattern(target):
                    found.setdefault(target.path, target)
                    hit = True
        return hit

    patterns: list[Pattern] = as_patterns(targets, "targets")
    if targets is None:
        for name, module in modules:
            add_module(name, module, explicit=False)
    for pattern in patterns:
        if is_literal(pattern) and pattern in tensors and pattern not in by_name:
            module_name, module, tensor = tensors[pattern]
            target = parameter_target(module_name, module, tensor, expert_layout)
            found[target.path] = target
            continue
        explicit = is_literal(pattern)
        hit = False
        for name, module in modules:
            if matches(pattern, name, module):
                hit = add_module(name, module, explicit) or hit
        if not explicit:
            hit = add_tensors(pattern) or hit
        if not hit and isinstance(pattern, str):
            raise _no_match(pattern, modules, tensors, types)
    if not found:
        raise LoRAError(
            f"targets {targets!r} match no supported layer in this model "
            f"(supported: {SUPPORTED_LAYERS}). Adaptable layers: {_adaptable(modules)[:20]}"
        )
    excluded = as_patterns(exclude, "exclude")
    for pattern in excluded:
        if isinstance(pattern, str) and not any(matches(pattern, n) for n in [*by_name, *tensors]):
            hint = nearest(pattern, [n for n in by_name if n] + list(tensors))
            raise LoRAError(
                f"exclude pattern {pattern!r} matches no module or parameter"
                + (f"; nearest names: {hint}" if hint else "")
                + "."
            )
    return [
        t
        for t in found.values()
        if not any(
            matches(p, t.module_name, t.module) or matches(p, t.path, t.module) for p in excluded
        )
    ]


def _can_carry_lora(tensor: Tensor | None) -> bool:
    """Whether a tensor reached by a pattern (not named literally) can take an adapter."""
    return (
        isinstance(tensor, Tensor)
        and not isinstance(tensor, nn.parameter.UninitializedParameter)
        and tensor.is_floating_point()
        and tensor.dim() >= 2
    )


def _reachable_by_pattern(target: AdaptTarget) -> bool:
    """Whether a tensor a pattern (not a literal path) reaches is adapted.

    A supported layer's weight and 2-D matrices are; a 3-D tensor only inside an experts
    block (so ``"encoder.*"`` never adapts a position table such as ``(1, tokens, dim)``);
    other tensors of 3 or more dimensions only when named literally.
    """
    if target.kind == "experts":
        return is_experts_module(target.module)
    return target.kind != "param" or len(target.shape) == 2


def _layer_types(layer_types: type | Sequence[type] | None) -> tuple[type, ...]:
    if layer_types is None:
        return ()
    types = (layer_types,) if isinstance(layer_types, type) else tuple(layer_types)
    if not all(isinstance(t, type) for t in types):
        raise LoRAError(f"layer_types must be classes such as nn.Linear; got {layer_types!r}.")
    return types


def _adaptable(modules: list[tuple[str, nn.Module]]) -> list[str]:
    return [n for n, m in modules if _is_adaptable(n, m)]


def _is_adaptable(name: str, module: nn.Module) -> bool:
    try:
        return module_targets(name, module) is not None
    except LoRAError:
        return False


def _no_match(
    pattern: str,
    modules: list[tuple[str, nn.Module]],
    tensors: Mapping[str, tuple[str, nn.Module, str]],
    types: tuple[type, ...],
) -> LoRAError:
    adaptable = _adaptable(modules)
    hint = nearest(pattern, adaptable or [n for n, _ in modules] + list(tensors))
    msg = f"target {pattern!r} matches no adaptable layer"
    if types:
        msg += f" of types {[t.__name__ for t in types]}"
    if hint:
        msg += f"; nearest names: {hint}"
        if is_literal(pattern) and any(h.endswith("." + pattern) for h in hint):
            msg += f" (patterns match full names: try '*{pattern}')"
    msg += f". Adaptable layers in this model: {adaptable[:20]}"
    if len(adaptable) > 20:
        msg += f" and {len(adaptable) - 20} more"
    return LoRAError(msg + ".")


def _check_number(value: object, what: str, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise LoRAError(f"{what} for '{path}' must be a positive number, got {value!r}.")
    return value


def inject(
    model: nn.Module,
    plan: Sequence[tuple[AdaptTarget, dict]],
    *,
    adapter: str,
    mode: Mode,
) -> None:
    """Register one LoRAParametrization per planned tensor; undo everything on failure."""
    done: list[AdaptTarget] = []
    try:
        for target, options in plan:
            like = base_tensor(target.module, target.param_name)
            if not like.is_floating_point():  # packed (bitsandbytes): adapters take its dtype
                like = getattr(target.module, target.param_name)
            options = dict(options)
            cls: type[LoRAParametrization] = LoRAParametrization
            if options.pop("use_dora", False):
                cls, options["base_weight"] = DoRAParametrization, like
            elif target.kind == "experts":
                cls = ExpertLoRAParametrization
            p = cls(
                target.fan_in,
                target.fan_out,
                target.shape,
                adapter=adapter,
                kind=target.kind,
                fan_in_fan_out=target.fan_in_fan_out,
                device=like.device,
                dtype=like.dtype,
                **options,
            )
            own_class(target.module)
            # Parameter order matters (optimizer state is positional): remember it once.
            target.module.__dict__.setdefault("_lora_param_order", list(target.module._parameters))
            # unsafe=True skips parametrize's trial evaluation of W + s*B@A (a weight-sized
            # temporary per layer); LoRAParametrization keeps shape and dtype by construction.
            parametrize.register_parametrization(target.module, target.param_name, p, unsafe=True)
            done.append(target)
            if (
                mode == "factored"
                and target.param_name == "weight"
                and factored_forward_applies(target.module, target.kind)
            ):
                install_factored_forward(target.module, target.kind)
    except BaseException:
        for target in reversed(done):
            drop_adapters(target.module, target.param_name, lambda q: q.adapter == adapter)
        raise
    guard_save_pretrained(model)


def add_lora(
    model: nn.Module,
    targets: Targets = None,
    *,
    rank: int | Mapping[str, int] = 4,
    alpha: float | Mapping[str, float] | None = None,
    exclude: Targets = None,
    layer_types: type | Sequence[type] | None = None,
    adapter: str = "default",
    dropout: float = 0.0,
    init: Init = "kaiming",
    use_rslora: bool = False,
    freeze: bool = True,
    trainable: Targets = None,
    bias: Bias = "none",
    mode: Mode = "factored",
    expert_layout: ExpertLayout | None = None,
    quantize: Literal["nf4", "int8"] | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Add a LoRA adapter to every matching layer of an existing model, in one call.

    Each matching weight gets a :class:`LoRAParametrization` through
    ``torch.nn.utils.parametrize``: ``layer.weight`` reads ``W + scale * B @ A`` while ``W``
    stays untouched. Every argument is checked before the model changes; on error the model
    is exactly as it was.

    Args:
        model: Any ``nn.Module``; changed in place and returned.
        targets: Which layers. None: every supported layer. A glob matched against the full
            qualified module name (``"fc*"``, ``"encoder.*.attn.*"``), a list of globs, a
            compiled regex (full match), or a callable ``(name, module) -> bool``. A literal
            parameter path (``"block.0.my_param"``) adapts that parameter as a matrix over its
            first dimension.
        rank: Rank, or a mapping ``{glob: rank}`` (first matching key wins, e.g.
            ``{"fc1": 8, "*": 2}``). A layer found by a pattern (``targets=None``, a glob, a
            regex, a callable) whose ``min(fan_in, fan_out)`` is below its rank gets that
            smaller rank, and one warning lists such layers; for a layer named literally in
            ``targets`` a too-large rank is a ``LoRAError``.
        alpha: Scale numerator (``scale = alpha / rank``); None means ``alpha = rank``. A
            number or a mapping like ``rank``.
        exclude: Patterns (same forms as ``targets``) removing matches.
        layer_types: Only layers that are instances of these classes.
        adapter: Name of this adapter; several adapters with different names can coexist.
        dropout: Dropout probability on the adapter's input.
        init: ``"kaiming"`` (as loralib/PEFT: uniform, N(0, 1) for embeddings) or
            ``"gaussian"`` (A ~ N(0, 1), as the tutorial).
        use_rslora: Scale by ``alpha / sqrt(rank)`` (rank-stabilized LoRA).
        freeze: Freeze every parameter except what the adapters train.
        trainable: Module patterns trained in full by this adapter (a classifier head). The
            adapter gets its own trainable copy of their parameters (PEFT's
            ``modules_to_save``); the pretrained ones stay untouched and come back whenever
            the adapter is disabled or inactive.
        bias: ``"none"``, ``"all"`` or ``"lora_only"`` (biases of adapted layers): biases this
            adapter trains, again as its own copies.
        mode: ``"factored"`` computes ``x W^T + s (x A^T) B^T`` in Linear, Conv, Embedding and
            HF Conv1D forwards (faster, leaner); ``"materialized"`` always builds ``W + sBA``.
        expert_layout: How 3-D expert tensors (mixture-of-experts) are stored: ``"out_in"``
            (``W[e]`` is ``(out, in)``, as Mixtral's ``F.linear(x, W[e])``) or ``"in_out"``;
            None follows each experts module's ``is_transposed`` flag (transformers sets it).
        quantize: ``"nf4"`` or ``"int8"`` first stores the adapted layers' weights packed
            (QLoRA; see :func:`lora_param.quantize_base`, whose defaults apply); None keeps them.
        use_dora: DoRA: also learn a magnitude per output, ``W' = m (W + sBA) / ||W + sBA||``
            (see :class:`~lora_param.variants.dora.DoRAParametrization`).

    Returns:
        The model, with the new adapter enabled and trainable.

    Raises:
        LoRAError: Any bad input; nothing was changed.
    """
    if not isinstance(model, nn.Module):
        raise LoRAError(f"add_lora needs an nn.Module, got {type(model).__name__}.")
    if not isinstance(adapter, str) or not _ADAPTER_NAME.fullmatch(adapter):
        raise LoRAError(
            f"adapter name {adapter!r} is invalid: use letters, digits, '_' or '-' (no dots)."
        )
    if adapter in list_adapters(model):
        raise LoRAError(
            f"adapter {adapter!r} already exists in this model; pass another adapter= name, "
            f"or remove_lora(model, {adapter!r}) first."
        )
    if mode not in ("factored", "materialized"):
        raise LoRAError(f"mode must be 'factored' or 'materialized', got {mode!r}.")
    if init not in ("kaiming", "gaussian"):
        raise LoRAError(f"init must be 'kaiming' or 'gaussian', got {init!r}.")
    if not isinstance(use_dora, bool):
        raise LoRAError(f"use_dora must be True or False, got {use_dora!r}.")
    if bias not in ("none", "all", "lora_only"):
        raise LoRAError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise LoRAError(f"dropout must be a number in [0, 1), got {dropout!r}.")
    found = find_targets(
        model, targets, exclude=exclude, layer_types=layer_types, expert_layout=expert_layout
    )
    if not found:
        raise LoRAError(f"exclude={exclude!r} removes every layer targets={targets!r} matched.")
    plan = []
    named = {p for p in as_patterns(targets, "targets") if is_literal(p)}
    lowered: list[str] = []
    for target in found:
        names = [target.module_name, target.path]
        r = pick(rank, names, "rank")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise LoRAError(f"rank for '{target.path}' must be a positive integer, got {r!r}.")
        if r > min(target.fan_in, target.fan_out) and not named & set(names):
            # Found by a pattern, not named: give the small layer the largest rank it can hold.
            r = min(target.fan_in, target.fan_out)
            lowered.append(f"{target.path} ({r})")
        if r > min(target.fan_in, target.fan_out):
            raise LoRAError(
                f"rank {r} for '{target.path}' exceeds min(fan_in={target.fan_in}, "
                f"fan_out={target.fan_out}) = {min(target.fan_in, target.fan_out)}; a LoRA "
                "update cannot have a larger rank than its matrix. Lower rank for this layer, "
                'e.g. rank={"'
                + target.module_name
                + f'": {min(target.fan_in, target.fan_out)}, "*": {r}}}.'
            )
        a = pick(alpha, names, "alpha")
        a = r if a is None else _check_number(a, "alpha", target.path)
        options = {
            "rank": r,
            "alpha": a,
            "dropout": dropout,
            "init": init,
            "use_rslora": use_rslora,
        }
        if use_dora:
            if target.kind == "experts":
                raise LoRAError(
                    f"use_dora=True on '{target.path}', a 3-D expert tensor: DoRA is supported on "
                    "Linear, Conv, Embedding, HF Conv1D and 2-D parameters. Exclude the experts "
                    '(exclude="*.experts") or add them in a separate add_lora call without DoRA.'
                )
            options["use_dora"] = True
        plan.append((target, options))
    sharded = [t.path for t, _ in plan if is_sharded(base_tensor(t.module, t.param_name))]
    if sharded:
        raise LoRAError(
            f"add_lora cannot adapt sharded (FSDP2) weights {sharded[:5]}: FSDP2 manages them. "
            "Call add_lora before fully_shard (with the same seed on every rank)."
        )
    keep = trainable_modules(model, trainable)
    copies = plan_copies(model, keep, bias, [t.module for t in found])
    undo_quantize = _quantize_for_lora(model, found, quantize, keep)
    # Copies first: they replace the pretrained value, the LoRA updates add on top of them.
    try:
        register_copies(copies, adapter)
    except BaseException:
        undo_quantize()
        raise
    try:
        inject(model, plan, adapter=adapter, mode=mode)
    except BaseException:
        for c in reversed(copies):
            drop_copies(c.module, c.tensor_name, lambda q: q.adapter == adapter)
        undo_quantize()
        raise
    if lowered:
        warnings.warn(
            f"adapter {adapter!r}: {len(lowered)} layer(s) are smaller than the rank asked for "
            f"and got the largest rank they can hold: {', '.join(lowered)}. Name a layer in "
            "targets to make a too-large rank an error instead.",
            stacklevel=2,
        )
    if freeze:
        freeze_base(model, [], "none")
    return model


def _quantize_for_lora(
    model: nn.Module, found: list[AdaptTarget], method: str | None, keep: list[nn.Module]
) -> Callable[[], None]:
    """Pack the targets' weights for ``add_lora(quantize=...)``; return the undo.

    Layers bitsandbytes quantized get their packed-weight entry here too, with or without
    ``quantize``.
    """
    from ..quant.api import prepare_bnb_layers, quantize_targets  # quant builds on core

    if method is None:
        return prepare_bnb_layers(found)
    packed = {id(t.module): t.path for t in found}
    trained = [packed[id(m)] for m in keep if id(m) in packed]
    if trained:
        raise LoRAError(
            f"{trained[:5]} would be stored packed (quantize={method!r}) and cannot train; "
            "remove them from trainable= or exclude them from targets."
        )
    # The user's string; quantize_targets checks it (check_method) before packing anything.
    undo_quantize = quantize_targets(found, method=method, root=model)  # type: ignore[arg-type]
    try:
        undo_bnb = prepare_bnb_layers(found)
    except BaseException:
        undo_quantize()
        raise

    def undo() -> None:
        undo_bnb()
        undo_quantize()

    return undo
