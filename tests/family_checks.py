"""One routine that walks a real model through the whole LoRA life cycle and checks each guarantee.

Used by tests/test_model_families.py (torchvision and Hugging Face models, random weights).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_param import (
    adapter_parameters,
    add_lora,
    disable_lora,
    enable_lora,
    iter_lora,
    list_adapters,
    load_lora,
    lora_disabled,
    merge_lora,
    save_lora,
)


@dataclass
class Report:
    model: nn.Module
    adapted: list[str]
    kinds: set[str]
    loss_before: float
    loss_after: float


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every base parameter, by its name in the plain model."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_A" in name or ".lora_B" in name:
            continue
        out[name.replace(".parametrizations.", ".").replace(".original", "")] = p.detach().clone()
    return out


def _sync_buffers(src: nn.Module, dst: nn.Module) -> None:
    """Copy running statistics (BatchNorm) so two models compute with the same buffers."""
    with torch.no_grad():
        for name, buf in src.named_buffers():
            dst.get_buffer(name).copy_(buf)


def _equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.equal(a, b), (
        f"{what}: max abs diff {(a - b).abs().max().item():.3g} (expected bit-identical)"
    )


def run_lora_lifecycle(
    base: nn.Module,
    targets,
    batch,
    forward: Callable[[nn.Module, object], torch.Tensor],
    loss: Callable[[nn.Module, object], torch.Tensor],
    tmp_path: Path,
    *,
    rank: int | dict = 4,
    steps: int = 2,
    lr: float = 1e-2,
    merge_atol: float = 1e-4,
    expect_kinds: Sequence[str] | None = None,
) -> Report:
    """add_lora with ``targets``, train, toggle, merge, save/load; assert every guarantee.

    Guarantees checked:
    * right after add_lora the model computes exactly what the base computes (B = 0);
    * only adapter parameters are trainable, and training leaves every base parameter unchanged;
    * LoRA off (``lora_disabled``, ``disable_lora``) is bit-identical to the base model;
    * LoRA on differs from the base after training, and ``enable_lora`` brings it back exactly;
    * ``merge_lora`` on a copy gives a plain model whose outputs match LoRA-on to float tolerance
      (and the original keeps working: the deepcopy-shares-the-class trap);
    * ``save_lora`` -> ``load_lora`` into a fresh base copy reproduces LoRA-on exactly.
    """
    base = base.eval()
    model = copy.deepcopy(base)
    before_params = _base_tensors(model)
    add_lora(model, targets, rank=rank)

    adapted = [path for path, *_ in iter_lora(model)]
    kinds = {p.kind for *_, p in iter_lora(model)}
    assert adapted, "add_lora adapted nothing"
    if expect_kinds is not None:
        assert set(expect_kinds) <= kinds, f"expected kinds {expect_kinds}, got {kinds}"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable), trainable

    with torch.no_grad():
        ref = forward(base, batch)
        _equal(forward(model.eval(), batch), ref, "zero-initialised LoRA vs base")

    # --- a few training steps (train mode: dropout, BatchNorm statistics update)
    params = adapter_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        value = loss(model, batch)
        value.backward()
        grads = [p.grad for p in params]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), (
            "missing or non-finite grads"
        )
        opt.step()
        losses.append(float(value.detach()))
    model.eval()
    assert all(torch.isfinite(torch.tensor(losses)))

    after_params = _base_tensors(model)
    assert before_params.keys() == after_params.keys()
    for name, value in before_params.items():
        _equal(after_params[name], value, f"base parameter {name} after training")

    # BatchNorm running statistics moved during training: give the reference the same ones
    reference = copy.deepcopy(base)
    _sync_buffers(model, reference)
    with torch.no_grad():
        ref = forward(reference, batch)
        on = forward(model, batch)
        assert not torch.allclose(on, ref), "training changed nothing: LoRA on equals the base"
        with lora_disabled(model):
            _equal(forward(model, batch), ref, "LoRA off (lora_disabled) vs base")
        _equal(forward(model, batch), on, "LoRA on after the with block")
        disable_lora(model)
        _equal(forward(model, batch), ref, "LoRA off (disable_lora) vs base")
        enable_lora(model)
        _equal(forward(model, batch), on, "LoRA on after enable_lora")

        merged = merge_lora(copy.deepcopy(model))
        assert not list(iter_lora(merged)) and not list_adapters(merged)
        assert set(merged.state_dict()) == set(reference.state_dict()), (
            "merged model keys differ from the base's"
        )
        torch.testing.assert_close(forward(merged, batch), on, rtol=1e-4, atol=merge_atol)
        _equal(forward(model, batch), on, "original model after merging a deepcopy")

    path = tmp_path / "adapter.pt"
    save_lora(model, path)
    fresh = copy.deepcopy(base)
    load_lora(fresh, path)
    _sync_buffers(model, fresh)
    fresh.eval()
    with torch.no_grad():
        _equal(forward(fresh, batch), on, "save_lora -> load_lora into a fresh base")
        with lora_disabled(fresh):
            _equal(forward(fresh, batch), ref, "loaded model with LoRA off vs base")
    return Report(model, adapted, kinds, losses[0], losses[-1])
