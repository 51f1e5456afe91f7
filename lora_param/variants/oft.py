"""OFT (orthogonal fine-tuning): a block-diagonal orthogonal ``R`` multiplies the weight.

Two operators go by this name, and :class:`OFTConfig`'s ``side`` picks one:

* ``side="input"`` (PEFT's ``OFTConfig``): the input features are rotated, ``W' = W Rᵀ``
  (``y = (x R) Wᵀ + b``). Each block's skew-symmetric ``Q`` is stored as its strict upper
  triangle (``oft_R``, ``(blocks, b(b-1)/2)``; one row with ``block_share``), and
  ``R = (I + Q)(I - Q)⁻¹`` is approximated by PEFT's Cayley–Neumann series
  ``I + 2Q + 2Q² + ... + 2Q^(n-2) + Q^(n-1)`` (``neumann_terms=n``, default 5; not exactly
  orthogonal), or computed exactly as ``(I - Q)(I + Q)⁻¹`` with ``cayley_neumann=False``
  (PEFT's two formulas differ in the sign of ``Q``: we follow each). ``coft=True`` clamps
  each block's ``‖Q‖_F`` to ``eps / sqrt(blocks)`` before every use, writing the clamped
  values back into ``oft_R`` as PEFT does. An embedding rotates its embedding dimension
  (``W' = W R``, PEFT's ``oft_embedding_R``).
* ``side="output"`` (LyCORIS diag-OFT, kohya's OFT): output blocks are rotated,
  ``W' = diag(rescale) · Rᵀ W`` per block of rows, with full ``(b, b)`` parameter blocks
  (``oft_blocks``), ``Q = B - Bᵀ``, the exact Cayley transform ``R = (I + Q)(I - Q)⁻¹``,
  the norm limit ``constraint`` (LyCORIS's and kohya's ``alpha``: ``Q`` is scaled down to
  ``‖Q‖_F = constraint · fan_out`` when larger; 0: no limit) and an optional trainable
  per-output ``rescale``.

``rank`` is the block size (the rotated dimension, ``fan_in`` or ``fan_out``, must be a
multiple of it); ``OFTConfig(n_blocks=k)`` asks for ``k`` blocks per layer instead. The
parameters start at zero (``R = I``): the model starts unchanged. The bias is never rotated.

Factored forward (no ``W'`` formed): the input side rotates ``x`` and runs the base layer
(Linear, Hugging Face Conv1D, 1×1 convolutions, whose channel rotation commutes with any
padding; an embedding rotates its output rows); the output side runs the base layer without
bias, rotates the output channels, rescales and adds the bias (any Linear, Conv1D or
convolution). Two cases compute with ``W'`` instead, because no transform of ``x`` or ``y``
alone expresses them: a ``k×k`` convolution (``k > 1``) on the input side (``R`` mixes kernel
positions), and on the output side a grouped convolution whose blocks span two groups (``W'``
moves a row to an output that reads another group's inputs; the references define OFT on the
weight, so that is the operator). ``R`` is computed in at
least float32 and applied in the layer's dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..core.errors import LoRAError
from ..core.layer_ops import LayerOps
from ..core.targets import LayerSpec
from ..core.variant import AdapterVariant, BaseOutput, VariantConfig, register_variant

__all__ = ["OFTConfig", "OFTParametrization", "OFTSide"]

OFTSide = Literal["input", "output"]
_SIDES = ("input", "output")
_KINDS: dict[str, frozenset[str]] = {
    "input": frozenset({"linear", "conv", "embedding", "conv1d_hf", "param"}),
    "output": frozenset({"linear", "conv", "conv1d_hf", "param"}),
}
# A norm clamp that left Q within this relative margin is not written back (a fixpoint).
_COFT_SLACK = 1e-6


@dataclass(frozen=True)
class OFTConfig(VariantConfig):
    """OFT options (``add_lora(variant=OFTConfig(...))``; ``rank`` is the block size).

    Attributes:
        side: ``"input"``: PEFT's OFT, ``W' = W Rᵀ``; ``"output"``: LyCORIS diag-OFT and
            kohya's OFT, ``W' = diag(rescale) Rᵀ W``.
        n_blocks: Blocks per layer instead of a block size (PEFT's ``r``, kohya's ``dim``);
            None: the block size is ``rank``.
        cayley_neumann: Input side: PEFT's Cayley–Neumann series (None: True, PEFT's default)
            or the exact Cayley transform (False). The output side is always exact.
        neumann_terms: Terms of the series (PEFT's ``num_cayley_neumann_terms``).
        coft: Input side: constrained OFT, each block's ``‖Q‖_F`` clamped to
            ``eps / sqrt(blocks)`` (PEFT's ``coft``).
        eps: COFT's radius.
        block_share: Input side: one block shared by all (PEFT's ``block_share``).
        constraint: Output side: norm limit, ``‖Q‖_F <= constraint * fan_out`` (LyCORIS's and
            kohya's ``alpha``); 0: none.
        rescale: Output side: a trainable per-output scale (LyCORIS's ``rescaled``).
    """

    name: ClassVar[str] = "oft"

    side: OFTSide = "input"
    n_blocks: int | None = None
    cayley_neumann: bool | None = None
    neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    constraint: float = 0.0
    rescale: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def rotated_dim(spec: LayerSpec, side: str) -> int:
    """The dimension OFT rotates: ``fan_in`` on the input side, ``fan_out`` on the output."""
    return spec.fan_in if side == "input" else spec.fan_out


def block_size_for(spec: LayerSpec, fields: Mapping[str, Any]) -> int:
    """The block size of an entry from its fields (``n_blocks`` wins over ``rank``)."""
    n_blocks = fields.get("n_blocks")
    if n_blocks:
        return rotated_dim(spec, fields.get("side", "input")) // int(n_blocks)
    return int(fields["rank"])


class OFTParametrization(AdapterVariant):
    """A block-diagonal orthogonal rotation of the weight's input or output features.

    Args:
        spec: The tensor seen as a matrix (see :class:`~lora_param.LayerSpec`).
        block_size: Size of each block; it divides the rotated dimension.
        side: ``"input"`` (PEFT's OFT) or ``"output"`` (LyCORIS diag-OFT / kohya's OFT).
        cayley_neumann: Input side: Cayley–Neumann series (True) or exact Cayley (False).
        neumann_terms: Terms of the series.
        coft: Input side: clamp each block's ``‖Q‖_F`` to ``eps / sqrt(blocks)``.
        eps: COFT's radius.
        block_share: Input side: one block shared by all.
        constraint: Output side: norm limit ``constraint * fan_out`` on ``‖Q‖_F`` (0: none).
        rescale: Output side: a trainable per-output scale.
        adapter: Name of the adapter.
        device: Device of the parameters.
        dtype: Dtype of the parameters (the weight's).
    """

    variant: ClassVar[str] = "oft"
    kinds: ClassVar[frozenset[str]] = _KINDS["input"] | _KINDS["output"]
    additive: ClassVar[bool] = False
    capabilities: ClassVar[frozenset[str]] = frozenset({"combine"})
    lowrank_exact: ClassVar[bool] = False
    inits: ClassVar[tuple[str, ...]] = ("kaiming",)

    oft_R: nn.Parameter  # input side
    oft_blocks: nn.Parameter  # output side
    rescale: nn.Parameter  # output side, with rescale=True

    def __init__(
        self,
        spec: LayerSpec,
        *,
        block_size: int,
        side: OFTSide = "input",
        cayley_neumann: bool = True,
        neumann_terms: int = 5,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        constraint: float = 0.0,
        rescale: bool = False,
        adapter: str = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(spec, adapter=adapter, dropout=0.0)
        self.side = side
        self.block_size = int(block_size)
        self.n_blocks = rotated_dim(spec, side) // self.block_size
        self.cayley_neumann = bool(cayley_neumann) and side == "input"
        self.neumann_terms = int(neumann_terms)
        self.coft, self.eps, self.block_share = bool(coft), float(eps), bool(block_share)
        self.constraint, self.rescaled = float(constraint), bool(rescale)
        shapes = self.tensor_shapes(spec, self.fields())
        for name, shape in shapes.items():
            init = torch.ones if name == "rescale" else torch.zeros
            setattr(self, name, nn.Parameter(init(shape, device=device, dtype=dtype)))

    # ---- the protocol: tensors and fields --------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """``oft_R`` (input side) or ``oft_blocks`` and, rescaled, ``rescale`` (output side)."""
        if self.side == "input":
            return {"oft_R": self.oft_R}
        out: dict[str, Tensor] = {"oft_blocks": self.oft_blocks}
        return {**out, "rescale": self.rescale} if self.rescaled else out

    @classmethod
    def tensor_shapes(cls, spec: LayerSpec, fields: Mapping[str, Any]) -> dict[str, tuple]:
        """``oft_R`` ``(blocks or 1, b(b-1)/2)``; ``oft_blocks`` ``(blocks, b, b)``,
        ``rescale`` ``(fan_out,)``."""
        side = fields.get("side", "input")
        b = block_size_for(spec, fields)
        blocks = rotated_dim(spec, side) // b
        if side == "input":
            return {"oft_R": (1 if fields.get("block_share") else blocks, b * (b - 1) // 2)}
        shapes: dict[str, tuple] = {"oft_blocks": (blocks, b, b)}
        if fields.get("rescale"):
            shapes["rescale"] = (spec.fan_out,)
        return shapes

    @classmethod
    def max_rank(cls, spec: LayerSpec) -> int:
        """The largest block size: the rotated dimension (the larger fan; checked per side)."""
        return max(spec.fan_in, spec.fan_out)

    @classmethod
    def rank_limit_text(cls, spec: LayerSpec) -> str:
        """How :meth:`max_rank` is computed."""
        return f"max(fan_in={spec.fan_in}, fan_out={spec.fan_out}) (OFT's rank is a block size)"

    @classmethod
    def check_fields(cls, spec: LayerSpec, fields: Mapping[str, Any], path: str) -> None:
        """The side, its layer kinds and options, and a block size that divides the dimension."""
        side = fields.get("side", "input")
        if side not in _SIDES:
            raise LoRAError(f"OFT side for '{path}' must be 'input' or 'output', got {side!r}.")
        if spec.kind not in _KINDS[side]:
            raise LoRAError(
                f"OFT with side='output' does not adapt {spec.kind!r} tensors such as '{path}' "
                "(it would rotate blocks of vocabulary rows; LyCORIS and kohya adapt Linear and "
                "Conv layers). Use side='input' (PEFT's OFT rotates the embedding dimension) or "
                "exclude them."
            )
        _check_options(side, fields, path)
        dim = rotated_dim(spec, side)
        which = "fan_in" if side == "input" else "fan_out"
        n_blocks: Any = fields.get("n_blocks")
        if n_blocks is not None:
            if not _is_int(n_blocks) or n_blocks <= 0 or dim % n_blocks or dim // n_blocks < 2:
                raise LoRAError(
                    f"OFT n_blocks={n_blocks!r} for '{path}' must divide its {which}={dim} into "
                    f"blocks of at least 2 (block sizes that fit: {_divisors(dim)[:12]})."
                )
        else:
            rank: Any = fields.get("rank")
            if not _is_int(rank) or rank < 2 or dim % rank:
                raise LoRAError(
                    f"OFT block size (rank) {rank!r} for '{path}' must divide its {which}={dim} "
                    f"(side={side!r}) and be at least 2; sizes that fit: {_divisors(dim)[:12]}. "
                    f'Pass e.g. rank={{"{path.rpartition(".")[0]}": {_nearest(dim, rank)}, '
                    '"*": ...} or OFTConfig(n_blocks=...).'
                )
        alpha = fields.get("alpha")
        if alpha is not None and "rank" in fields and alpha != fields["rank"]:
            raise LoRAError(
                f"OFT has no alpha scale (alpha={alpha!r} for '{path}'); its strength is the "
                "rotation itself. Leave alpha unset (LyCORIS's and kohya's norm limit 'alpha' is "
                "OFTConfig(side='output', constraint=...))."
            )
        if fields.get("use_rslora", False):
            raise LoRAError(f"OFT has no scale for use_rslora to change ('{path}').")
        if fields.get("dropout", 0.0):
            raise LoRAError(
                f"OFT has no dropout (dropout={fields.get('dropout')!r} for '{path}'): PEFT 0.21's "
                "module_dropout is never applied in its forward. Use dropout=0."
            )
        if fields.get("init", "kaiming") not in cls.inits:
            raise LoRAError(
                f"OFT starts from the identity rotation (R = I) and has no init option "
                f"(init={fields.get('init')!r} for '{path}'); leave init at its default."
            )

    def fields(self) -> dict[str, Any]:
        """The side, the block size (as ``rank``) and the side's options."""
        return {
            "side": self.side,
            "rank": self.block_size,
            "n_blocks": None,
            "cayley_neumann": self.cayley_neumann,
            "neumann_terms": self.neumann_terms,
            "coft": self.coft,
            "eps": self.eps,
            "block_share": self.block_share,
            "constraint": self.constraint,
            "rescale": self.rescaled,
        }

    @classmethod
    def from_fields(
        cls,
        spec: LayerSpec,
        fields: Mapping[str, Any],
        *,
        adapter: str,
        device: torch.device | None,
        dtype: torch.dtype | None,
        base_weight: Tensor | None,
    ) -> OFTParametrization:
        """Build from ``add_lora``'s or a file's fields, at ``R = I``."""
        side = fields.get("side", "input")
        neumann = fields.get("cayley_neumann")
        return cls(
            spec,
            block_size=block_size_for(spec, fields),
            side=side,
            cayley_neumann=(side == "input") if neumann is None else bool(neumann),
            neumann_terms=int(fields.get("neumann_terms", 5)),
            coft=bool(fields.get("coft", False)),
            eps=float(fields.get("eps", 6e-5)),
            block_share=bool(fields.get("block_share", False)),
            constraint=float(fields.get("constraint", 0.0)),
            rescale=bool(fields.get("rescale", False)),
            adapter=adapter,
            device=device,
            dtype=dtype,
        )

    # ---- the rotation -----------------------------------------------------------------------

    def _project(self) -> None:
        """COFT: clamp each block's ``‖Q‖_F`` to ``eps / sqrt(blocks)``, in place (as PEFT)."""
        vec = self.oft_R
        limit = self.eps / math.sqrt(vec.shape[0])
        with torch.no_grad():
            # ||Q||_F of the skew matrix: both triangles hold the vector's values.
            norms = vec.detach().norm(dim=1, keepdim=True) * math.sqrt(2.0)
            over = norms > limit * (1 + _COFT_SLACK)
            if torch.compiler.is_compiling() or not bool(over.any()):
                return
            vec.copy_(torch.where(over, vec * (limit / norms), vec))

    def _skew(self, dtype: torch.dtype) -> Tensor:
        """The skew-symmetric blocks ``Q`` ``(stored blocks, b, b)`` in ``dtype``."""
        b = self.block_size
        if self.side == "input":
            vec = self.oft_R.to(dtype)
            if self.coft and torch.compiler.is_compiling():  # no write-back while tracing
                norms = vec.norm(dim=1, keepdim=True) * math.sqrt(2.0)
                limit = self.eps / math.sqrt(vec.shape[0])
                vec = torch.where(norms > limit, vec * (limit / norms), vec)
            flat = vec.new_zeros(vec.shape[0], b * b).index_copy(1, _upper(b, vec.device), vec)
            q = flat.view(-1, b, b)
            return q - q.transpose(-2, -1)
        blocks = self.oft_blocks.to(dtype)
        q = blocks - blocks.transpose(-2, -1)
        if self.constraint > 0:
            limit = self.constraint * self.fan_out
            norm = torch.linalg.vector_norm(q) + 1e-8
            q = q * torch.where(norm > limit, limit / norm, torch.ones_like(norm))
        return q

    def rotation(self, dtype: torch.dtype | None = None) -> Tensor:
        """The blocks ``R`` ``(blocks, b, b)``, computed in at least float32, in ``dtype``.

        Input side: PEFT's series ``I + 2Q + ... + Q^(n-1)`` or ``(I - Q)(I + Q)⁻¹``;
        output side: ``(I + Q)(I - Q)⁻¹``. With ``block_share`` the one block is repeated.
        """
        anchor = self.anchor()
        wide = self.compute_dtype_for(anchor)
        if self.side == "input" and self.coft and not torch.compiler.is_compiling():
            self._project()
        q = self._skew(wide)
        n, b = q.shape[0], self.block_size
        eye = torch.eye(b, device=q.device, dtype=wide)
        if self.side == "output":
            r = (eye + q) @ torch.linalg.inv(eye - q)
        elif self.cayley_neumann:
            r = _cayley_neumann(q, self.neumann_terms)
        else:
            ident = eye.unsqueeze(0).expand(n, b, b)
            r = torch.linalg.solve(ident + q, ident - q, left=False)
        if self.block_share:
            r = r.expand(self.n_blocks, b, b)
        return r.to(dtype or anchor.dtype)

    def _rescale(self, dtype: torch.dtype) -> Tensor | None:
        return self.rescale.to(dtype) if self.rescaled else None

    # ---- the math ---------------------------------------------------------------------------

    def adapt(self, weight: Tensor, dropout: bool = False) -> Tensor:
        """``W Rᵀ`` (``W R`` for an embedding) on the input side, ``diag(s) Rᵀ W`` on the
        output side, in ``weight``'s dtype."""
        r = self.rotation(weight.dtype)
        if self.side == "input":
            if self.fan_in_fan_out:  # stored (in, out): W' stored is R_bd @ weight
                w = weight.reshape(self.n_blocks, self.block_size, -1)
                return torch.bmm(r, w).reshape(weight.shape)
            matrix = weight.reshape(self.fan_out, self.fan_in)
            rot = r if self.kind == "embedding" else r.transpose(-2, -1)
            return rotate(matrix, rot).view(weight.shape)
        scale = self._rescale(weight.dtype)
        if self.fan_in_fan_out:  # stored (in, out): rotate its columns
            out = rotate(weight, r)
            return out if scale is None else out * scale
        matrix = weight.reshape(self.n_blocks, self.block_size, -1)
        out = torch.bmm(r.transpose(-2, -1), matrix).reshape(self.fan_out, -1)
        if scale is not None:
            out = out * scale.unsqueeze(1)
        return out.view(weight.shape)

    def layer_forward(
        self,
        ops: LayerOps,
        layer: Any,
        x: Tensor,
        base: BaseOutput,
        weight: Callable[[], Tensor],
    ) -> Tensor | None:
        """Rotate ``x`` then run the base (input side), or rotate the base's output (output
        side); None (``W'`` is formed) for the two cases of the module docstring."""
        if self.side == "input":
            if self.kind == "embedding":
                y = base(layer, x, False)
                return rotate(y, self.rotation(y.dtype))
            if self.kind == "conv":
                if any(k != 1 for k in layer.kernel_size):
                    return None
                x_rot = rotate(x.movedim(1, -1), self.rotation(x.dtype), layer.groups)
                return base(layer, x_rot.movedim(-1, 1), True)
            return base(layer, rotate(x, self.rotation(x.dtype)), True)
        if self.kind == "conv" and (self.fan_out // layer.groups) % self.block_size:
            return None  # a block spans two groups: W' mixes rows that read other inputs
        y = base(layer, x, False)
        bias = getattr(layer, "bias", None)
        channels_first = ops.channel_dim == 1
        if channels_first:
            y = y.movedim(1, -1)
        out = rotate(y, self.rotation(y.dtype))
        scale = self._rescale(out.dtype)
        if scale is not None:
            out = out * scale
        if bias is not None:
            out = out + bias
        return out.movedim(-1, 1) if channels_first else out

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter!r}, kind={self.kind}, side={self.side!r}, "
            f"blocks={self.n_blocks}, block_size={self.block_size}, enabled={self._enabled}"
        )


def rotate(t: Tensor, r: Tensor, copies: int = 1) -> Tensor:
    """``t`` with its last dimension cut in blocks, each times its block of ``r``: ``t_k R_k``.

    ``r`` is ``(blocks, b, b)``; ``copies`` repeats it along the last dimension (the groups of
    a grouped convolution each get the same rotation). PEFT's ``einsum("...rk,rkc->...rc")``,
    computed as one batched matmul over the blocks (``einsum`` hands ``bmm`` a layout it runs
    an order of magnitude slower on CPU).
    """
    blocks, b, _ = r.shape
    if copies > 1:
        r = r.unsqueeze(0).expand(copies, blocks, b, b).reshape(copies * blocks, b, b)
    lead = t.shape[:-1]
    out = torch.bmm(t.reshape(-1, r.shape[0], b).transpose(0, 1).contiguous(), r)
    return out.transpose(0, 1).reshape(*lead, -1)


def _upper(b: int, device: torch.device) -> Tensor:
    """Flat positions of a ``(b, b)`` block's strict upper triangle, row by row (PEFT's order)."""
    if torch.compiler.is_compiling():  # traced once into the graph; no cache to consult
        return _upper_positions(b, device)
    return _upper_cached(b, device)


def _upper_positions(b: int, device: torch.device) -> Tensor:
    rows, cols = torch.triu_indices(b, b, 1, device=device)
    return rows * b + cols


_upper_cached = functools.lru_cache(maxsize=64)(_upper_positions)


def _cayley_neumann(q: Tensor, terms: int) -> Tensor:
    """PEFT 0.21's series for ``(I + Q)(I - Q)⁻¹``, operation for operation.

    ``I + 2Q + 2Q² + ... + 2Q^(n-2) + Q^(n-1)`` for ``n = terms >= 4``; ``n = 3`` gives the
    same as 4, ``2`` gives ``I + 2Q``, ``1`` gives ``I``.
    """
    n, b, _ = q.shape
    r = torch.eye(b, device=q.device, dtype=q.dtype).repeat(n, 1, 1)
    if terms > 1:
        r.add_(q, alpha=2.0)
        if terms > 2:
            power = torch.bmm(q, q)
            r.add_(power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                r.add_(power, alpha=2.0)
            r.add_(torch.bmm(power, q))
    return r


def _nearest(dim: int, rank: Any) -> int:
    divisors = _divisors(dim) or [dim]
    target = rank if _is_number(rank) else 2
    return min(divisors, key=lambda d: (abs(d - target), d))


def _check_options(side: str, fields: Mapping[str, Any], path: str) -> None:
    """Each option has its type, and only the side's reference has it set."""
    for name in ("coft", "block_share", "rescale"):
        if not isinstance(fields.get(name, False), bool):
            raise LoRAError(f"OFT {name} for '{path}' must be True or False.")
    neumann = fields.get("cayley_neumann")
    if neumann is not None and not isinstance(neumann, bool):
        raise LoRAError(f"OFT cayley_neumann for '{path}' must be True, False or None.")
    terms = fields.get("neumann_terms", 5)
    if not _is_int(terms) or terms < 1:
        raise LoRAError(
            f"OFT neumann_terms for '{path}' must be a positive integer, got {terms!r}."
        )
    eps, constraint = fields.get("eps", 6e-5), fields.get("constraint", 0.0)
    if not _is_number(eps) or eps <= 0:
        raise LoRAError(f"OFT eps for '{path}' must be a positive number, got {eps!r}.")
    if not _is_number(constraint) or constraint < 0:
        raise LoRAError(
            f"OFT constraint for '{path}' must be a number >= 0 (0: no limit), got {constraint!r}."
        )
    if side == "input":
        wrong = [n for n in ("constraint", "rescale") if fields.get(n)]
        hint = "they are LyCORIS/kohya options: use side='output'"
    else:
        wrong = [n for n in ("coft", "block_share", "cayley_neumann") if fields.get(n)]
        hint = "they are PEFT options: use side='input'"
    if wrong:
        raise LoRAError(f"OFT side={side!r} has no {wrong} ('{path}'); {hint}.")


def _register() -> None:
    register_variant(OFTConfig, OFTParametrization)
