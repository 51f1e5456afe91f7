"""``add_lora``: find the target layers by name and register an adapter on each, atomically."""

from __future__ import annotations

import functools
import operator
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .config import Bias, LoRAConfig, Mode, QuantizationConfig, pack_targets, quantization_config
from .copies import drop_copies, plan_copies, register_copies
from .distributed import ORDER, fsdp_modules
from .entries import drop_entries, register_entry
from .entry import AdapterEntry
from .errors import LoRAError
from .forward import factored_forward_applies, install_forward
from .freeze import freeze_base, trainable_modules
from .generated_class import class_before_parametrizations
from .hf_save import guard_save_pretrained
from .lookup import list_adapters
from .matching import Pattern, Targets, as_patterns, is_literal, matches, nearest, pick
from .targets import (
    SUPPORTED_LAYERS,
    AdaptTarget,
    ExpertLayout,
    base_tensor,
    is_experts_module,
    join,
    module_targets,
    parameter_target,
    tensor_names,
)
from .variant import AdapterVariant, VariantConfig, init_variant, variant_class

__all__ = [
    "ADAPTER_NAME",
    "Mode",
    "TargetPreparer",
    "add_lora",
    "check_adapter_name",
    "find_targets",
    "inject",
    "register_target_preparer",
]

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")
_ADAPTER_NAME = ADAPTER_NAME  # 0.2 name, used by other modules

#: ``(targets) -> undo``: readies layers of a plug-in's own for adapters before they are
#: registered (e.g. puts a base store under a bitsandbytes layer's weight).
TargetPreparer = Callable[[list[AdaptTarget]], Callable[[], None]]
_PREPARERS: list[TargetPreparer] = []


def register_target_preparer(preparer: TargetPreparer) -> None:
    """Let a plug-in ready its layers before adapters go on them (called with every target)."""
    if preparer not in _PREPARERS:
        _PREPARERS.append(preparer)


def _prepare(targets: list[AdaptTarget]) -> Callable[[], None]:
    undos: list[Callable[[], None]] = []
    try:
        for preparer in _PREPARERS:
            undos.append(preparer(targets))
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return undo_all


def check_adapter_name(name: object, what: str = "adapter name") -> str:
    """Raise LoRAError unless ``name`` can name an adapter (letters, digits, ``_``, ``-``)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise LoRAError(f"{what} {name!r} is invalid: use letters, digits, '_' or '-' (no dots).")
    return name


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules of the user's model, without the ones parametrize adds."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if ".parametrizations" not in f".{n}" and not isinstance(m, AdapterEntry)
    ]


def _tensor_paths(modules: list[tuple[str, nn.Module]]) -> dict[str, tuple[str, nn.Module, str]]:
    return {join(n, t): (n, m, t) for n, m in modules for t in tensor_names(m)}


def _unsupported(name: str, module: nn.Module) -> LoRAError:
    cls = class_before_parametrizations(module).__name__
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
        The targets, each tensor once: in model order for one pattern, pattern by pattern for
        a list.

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
    plan: Sequence[tuple[AdaptTarget, Mapping[str, Any]]],
    *,
    adapter: str,
    mode: Mode,
    from_file: bool = False,
) -> list[AdapterVariant]:
    """Register one adapter entry per planned tensor; undo everything on failure.

    Args:
        model: The model (its ``save_pretrained`` gets guarded).
        plan: ``(target, fields)``: the tensor and the entry's fields (``variant`` and that
            variant's settings, as an adapter file records them).
        adapter: The adapter's name.
        mode: ``"factored"`` installs the adapted forward on layers where it is exact.
        from_file: The caller fills every tensor of the new entries from a file next
            (``load_lora``): variants that :attr:`~AdapterVariant.loads_without_weight` get no
            weight.

    Returns:
        The entries registered, in plan order.
    """
    done: list[tuple[AdaptTarget, AdapterVariant]] = []
    undo_prepare = _prepare([t for t, _ in plan])
    try:
        for target, fields in plan:
            module, name = target.module, target.param_name
            cls = variant_class(str(fields.get("variant", "lora")), target.kind, target.path)
            like = base_tensor(module, name)
            current: Tensor | None = None
            skip = from_file and cls.loads_without_weight
            if (cls.needs_weight and not skip) or not like.is_floating_point():
                with torch.no_grad():  # the weight as the layer sees it now (dequantized)
                    current = getattr(module, name)
                like = current if not like.is_floating_point() else like
            entry = cls.from_fields(
                target.spec,
                fields,
                adapter=adapter,
                device=like.device,
                dtype=like.dtype,
                base_weight=None if skip else current,
            )
            register_entry(module, name, entry)
            done.append((target, entry))
            if (
                mode == "factored"
                and name == "weight"
                and factored_forward_applies(module, target.kind)
            ):
                install_forward(module, target.kind)
    except BaseException:
        for target, entry in reversed(done):
            drop_entries(target.module, target.param_name, functools.partial(operator.is_, entry))
        undo_prepare()
        raise
    guard_save_pretrained(model)
    return [entry for _, entry in done]


_CONFIG_KEYWORDS = {f: getattr(LoRAConfig(), f) for f in LoRAConfig().keywords()}


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
    init: str = "kaiming",
    use_rslora: bool = False,
    freeze: bool = True,
    trainable: Targets = None,
    bias: Bias = "none",
    mode: Mode = "factored",
    expert_layout: ExpertLayout | None = None,
    quantize: str | QuantizationConfig | None = None,
    variant: str | VariantConfig = "lora",
    use_dora: bool = False,
    config: LoRAConfig | None = None,
) -> nn.Module:
    """Add an adapter to every matching layer of an existing model, in one call.

    Each matching weight gets an adapter entry (plain LoRA by default, a
    :class:`LoRAParametrization`) through ``torch.nn.utils.parametrize``: ``layer.weight``
    reads ``W + scale * B @ A`` while ``W`` stays untouched. Every argument is checked before
    the model changes; on error the model is exactly as it was. The keywords and
    ``config=LoRAConfig(...)`` are two spellings of the same call.

    Args:
        model: Any ``nn.Module``; changed in place and returned.
        targets: Which layers. None: every supported layer. A glob matched against the full
            qualified module name (``"fc*"``, ``"encoder.*.attn.*"``), a list of globs, a
            compiled regex (full match), or a callable ``(name, module) -> bool``. A literal
            parameter path (``"block.0.my_param"``) adapts that parameter as a matrix over its
            first dimension.
        rank: Rank, or a mapping ``{glob: rank}`` (first matching key wins, e.g.
            ``{"fc1": 8, "*": 2}``). A layer found by a pattern (``targets=None``, a glob, a
            regex, a callable) whose matrix cannot hold its rank gets the largest rank it can,
            and one warning lists such layers; for a layer named literally in ``targets`` a
            too-large rank is a ``LoRAError``.
        alpha: Scale numerator (``scale = alpha / rank``); None means ``alpha = rank``. A
            number or a mapping like ``rank``.
        exclude: Patterns (same forms as ``targets``) removing matches.
        layer_types: Only layers that are instances of these classes.
        adapter: Name of this adapter; several adapters with different names can coexist.
        dropout: Dropout probability on the adapter's input.
        init: ``"kaiming"`` (as loralib/PEFT: uniform, N(0, 1) for embeddings) or
            ``"gaussian"`` (A ~ N(0, 1), as the tutorial); from the weight, with LoRA or DoRA:
            ``"pissa"`` (its top singular vectors; ``"pissa_niter_<K>"``: a fast randomized
            SVD), ``"olora"`` (its QR), which keep the weight untouched (see the variants
            guide); variants may offer more.
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
        quantize: Store the adapted layers' weights packed first (QLoRA): a method name,
            ``"nf4"`` or ``"int8"`` (defaults of :func:`lora_param.quantize_base`), or its
            options, e.g. ``lora_param.NF4Config(block_size=128, compute_dtype=torch.bfloat16)``;
            None keeps them.
        variant: The adapter variant: ``"lora"`` (default), ``"dora"``, ... or an options
            object such as ``lora_param.DoRAConfig()`` (see ``lora_param.variant_names()``).
        use_dora: Shorthand for ``variant="dora"``: also learn a magnitude per output,
            ``W' = m (W + sBA) / ||W + sBA||`` (see :class:`lora_param.DoRAParametrization`).
        config: All of the above (but ``adapter``) as one :class:`lora_param.LoRAConfig`; pass
            either ``config`` or the keywords.

    Returns:
        The model, with the new adapter enabled and trainable.

    Raises:
        LoRAError: Any bad input; nothing was changed.
    """
    keywords: dict[str, Any] = {
        "targets": targets,
        "rank": rank,
        "alpha": alpha,
        "exclude": exclude,
        "layer_types": layer_types,
        "dropout": dropout,
        "init": init,
        "use_rslora": use_rslora,
        "variant": variant,
        "trainable": trainable,
        "bias": bias,
        "mode": mode,
        "expert_layout": expert_layout,
        "quantize": quantize,
        "freeze": freeze,
    }
    if not isinstance(use_dora, bool):
        raise LoRAError(f"use_dora must be True or False, got {use_dora!r}.")
    if config is not None:
        if not isinstance(config, LoRAConfig):
            raise LoRAError(f"config must be a lora_param.LoRAConfig, got {type(config).__name__}.")
        given = [k for k, v in keywords.items() if _given(v, _CONFIG_KEYWORDS[k])] + (
            ["use_dora"] if use_dora else []
        )
        if given:
            raise LoRAError(
                f"pass either config= or keywords, not both (got {', '.join(given)} besides "
                "config); use config.replace(...) to change a field."
            )
    else:
        if use_dora:
            if variant not in ("lora", "dora"):
                raise LoRAError(f"use_dora=True and variant={variant!r} disagree; pass one.")
            keywords["variant"] = "dora"
        config = LoRAConfig(**keywords)
    return _add(model, config, adapter)


def _given(value: Any, default: Any) -> bool:
    """Whether a keyword differs from its default (numbers and lists by value)."""
    if value is default:
        return False
    try:
        return bool(value != default)
    except Exception:  # objects whose comparison raises: count them as given
        return True


def _check_config(config: LoRAConfig) -> None:
    if config.mode not in ("factored", "materialized"):
        raise LoRAError(f"mode must be 'factored' or 'materialized', got {config.mode!r}.")
    if config.bias not in ("none", "all", "lora_only"):
        raise LoRAError(f"bias must be 'none', 'all' or 'lora_only', got {config.bias!r}.")
    dropout = config.dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise LoRAError(f"dropout must be a number in [0, 1), got {dropout!r}.")
    if not isinstance(config.use_rslora, bool):
        raise LoRAError(f"use_rslora must be True or False, got {config.use_rslora!r}.")


def _plan_layers(
    found: list[AdaptTarget], config: LoRAConfig
) -> tuple[list[tuple[AdaptTarget, dict[str, Any]]], list[str]]:
    """Each target's entry fields; the layers whose rank was lowered to fit (for a warning)."""
    options = config.variant_options()
    name = init_variant(options.name, config.init)  # e.g. init="pissa": the pissa variant
    named = {p for p in as_patterns(config.targets, "targets") if is_literal(p)}
    plan = []
    lowered: list[str] = []
    for target in found:
        cls = variant_class(name, target.kind, target.path)
        names = [target.module_name, target.path]
        r = pick(config.rank, names, "rank")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise LoRAError(f"rank for '{target.path}' must be a positive integer, got {r!r}.")
        limit = cls.max_rank(target.spec)
        if r > limit and not named & set(names):
            # Found by a pattern, not named: give the small layer the largest rank it can hold.
            r = limit
            lowered.append(f"{target.path} ({r})")
        if r > limit:
            raise LoRAError(
                f"rank {r} for '{target.path}' exceeds {cls.rank_limit_text(target.spec)} = "
                f"{limit}; an adapter update cannot have a larger rank than its matrix. "
                'Lower rank for this layer, e.g. rank={"'
                + target.module_name
                + f'": {limit}, "*": {r}}}.'
            )
        a = pick(config.alpha, names, "alpha")
        a = r if a is None else _check_number(a, "alpha", target.path)
        fields: dict[str, Any] = {
            "variant": name,
            "rank": r,
            "alpha": float(a),
            "dropout": float(config.dropout),
            "init": config.init,
            "use_rslora": config.use_rslora,
            **options.to_fields(),
        }
        cls.check_fields(target.spec, fields, target.path)
        plan.append((target, fields))
    return plan, lowered


def _add(model: nn.Module, config: LoRAConfig, adapter: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise LoRAError(f"add_lora needs an nn.Module, got {type(model).__name__}.")
    check_adapter_name(adapter)
    if adapter in list_adapters(model):
        raise LoRAError(
            f"adapter {adapter!r} already exists in this model; pass another adapter= name, "
            f"or remove_lora(model, {adapter!r}) first."
        )
    _check_config(config)
    quant = None if config.quantize is None else quantization_config(config.quantize)
    found = find_targets(
        model,
        config.targets,
        exclude=config.exclude,
        layer_types=config.layer_types,
        expert_layout=config.expert_layout,
    )
    if not found:
        raise LoRAError(
            f"exclude={config.exclude!r} removes every layer targets={config.targets!r} matched."
        )
    plan, lowered = _plan_layers(found, config)
    keep = trainable_modules(model, config.trainable)
    copies = plan_copies(model, keep, config.bias, [t.module for t in found])
    managed = fsdp_modules(model)
    sharded = [t.path for t, _ in plan if id(t.module) in managed]
    sharded += [c.path for c in copies if id(c.module) in managed]
    if sharded:
        raise LoRAError(
            f"add_lora cannot adapt sharded (FSDP2) weights {sharded[:5]}: FSDP2 manages them. "
            f"Call add_lora before fully_shard (with the same seed on every rank): {ORDER}"
        )
    undo_quantize = _quantize_for_lora(model, found, quant, keep)
    # Copies first: they replace the pretrained value, the updates add on top of them.
    try:
        register_copies(copies, adapter)
    except BaseException:
        undo_quantize()
        raise
    try:
        inject(model, plan, adapter=adapter, mode=config.mode)
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
            stacklevel=3,
        )
    if config.freeze:
        freeze_base(model, [], "none")
    return model


def _quantize_for_lora(
    model: nn.Module,
    found: list[AdaptTarget],
    method: QuantizationConfig | None,
    keep: list[nn.Module],
) -> Callable[[], None]:
    """Pack the targets' weights for ``add_lora(quantize=...)``; return the undo."""
    if method is None:
        return lambda: None
    packed = {id(t.module): t.path for t in found}
    trained = [packed[id(m)] for m in keep if id(m) in packed]
    if trained:
        raise LoRAError(
            f"{trained[:5]} would be stored packed (quantize={method.name!r}) and cannot train; "
            "remove them from trainable= or exclude them from targets."
        )
    return pack_targets(found, method, model)
