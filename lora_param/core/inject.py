"""``add_lora``: find the target layers by name and register an adapter on each, atomically."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

from torch import nn
from torch.nn.utils import parametrize

from .classes import own_class
from .dora import DoRAParametrization
from .errors import LoRAError
from .factored import factored_forward_applies, install_factored_forward
from .freeze import Bias, freeze_base, trainable_modules
from .layers import (
    SUPPORTED_LAYERS,
    AdaptTarget,
    base_tensor,
    join,
    module_targets,
    parameter_target,
    tensor_names,
)
from .matching import Pattern, Targets, as_patterns, is_literal, matches, nearest, pick
from .merge import drop_adapters
from .parametrization import Init, LoRAParametrization
from .registry import list_adapters

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
) -> list[AdaptTarget]:
    """Resolve target patterns to the tensors that will carry LoRA, checking every pattern.

    Args:
        model: The model to search.
        targets: None for every supported layer; a glob (full match of the qualified module
            name), a list of globs, a compiled regex (full match), or a callable
            ``(name, module) -> bool``. A literal parameter path adapts that parameter.
        exclude: Patterns (same forms) removing matches.
        layer_types: Only modules that are instances of these types match.

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
        adapted = module_targets(name, module)
        if adapted is None:
            if explicit:
                raise _unsupported(name, module)
            return False
        found.update((t.path, t) for t in adapted)
        return True

    patterns: list[Pattern] = as_patterns(targets, "targets")
    if targets is None:
        for name, module in modules:
            add_module(name, module, explicit=False)
    for pattern in patterns:
        if is_literal(pattern) and pattern in tensors and pattern not in by_name:
            module_name, module, tensor = tensors[pattern]
            target = parameter_target(module_name, module, tensor)
            found[target.path] = target
            continue
        explicit = is_literal(pattern)
        hit = False
        for name, module in modules:
            if matches(pattern, name, module):
                hit = add_module(name, module, explicit) or hit
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
            matches(p, t.module_name, t.module) or (isinstance(p, str) and matches(p, t.path))
            for p in excluded
        )
    ]


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
            options = dict(options)
            dora = {"base_weight": like} if options.pop("use_dora", False) else {}
            p = (DoRAParametrization if dora else LoRAParametrization)(
                target.fan_in,
                target.fan_out,
                target.shape,
                adapter=adapter,
                kind=target.kind,
                fan_in_fan_out=target.fan_in_fan_out,
                device=like.device,
                dtype=like.dtype,
                **options,
                **dora,
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
            ``{"fc1": 8, "*": 2}``).
        alpha: Scale numerator (``scale = alpha / rank``); None means ``alpha = rank``. A
            number or a mapping like ``rank``.
        exclude: Patterns (same forms as ``targets``) removing matches.
        layer_types: Only layers that are instances of these classes.
        adapter: Name of this adapter; several adapters with different names can coexist.
        dropout: Dropout probability on the adapter's input.
        init: ``"kaiming"`` (as loralib/PEFT) or ``"gaussian"`` (A ~ N(0, 1), as the tutorial).
        use_rslora: Scale by ``alpha / sqrt(rank)`` (rank-stabilized LoRA).
        freeze: Freeze every parameter except the enabled adapters, ``trainable`` and ``bias``.
        trainable: Module patterns whose parameters stay trainable (a classifier head).
        bias: ``"none"``, ``"all"`` or ``"lora_only"`` (biases of adapted layers train).
        mode: ``"factored"`` computes ``x W^T + s (x A^T) B^T`` in Linear, Conv, Embedding and
            HF Conv1D forwards (faster, leaner); ``"materialized"`` always builds ``W + sBA``.
        use_dora: DoRA: also learn a magnitude per output, ``W' = m (W + sBA) / ||W + sBA||``
            (see :class:`~lora_param.core.dora.DoRAParametrization`).

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
    found = find_targets(model, targets, exclude=exclude, layer_types=layer_types)
    if not found:
        raise LoRAError(f"exclude={exclude!r} removes every layer targets={targets!r} matched.")
    plan = []
    for target in found:
        names = [target.module_name, target.path]
        r = pick(rank, names, "rank")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise LoRAError(f"rank for '{target.path}' must be a positive integer, got {r!r}.")
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
        options = dict(rank=r, alpha=a, dropout=dropout, init=init, use_rslora=use_rslora)
        if use_dora:
            options["use_dora"] = True
        plan.append((target, options))
    keep = trainable_modules(model, trainable) if freeze else []
    inject(model, plan, adapter=adapter, mode=mode)
    if freeze:
        freeze_base(model, keep, bias)
    return model
