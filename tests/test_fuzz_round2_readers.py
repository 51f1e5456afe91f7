"""Property-based fuzzing of the readers added in round 2: kohya files, packed state dicts, and
the Trainer's adapter checkpoint.

Each damaged input must give a ``LoRAError`` (the model then bit-identical) or a valid load;
any other exception fails. The mutators and the contract check come from ``tests/fuzzing.py``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import lora_param as lp
from lora_param import LoRAError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fuzzing.py, next to this file
from fuzzing import (
    FUZZ,
    byte_damage,
    check_reader_contract,
    damage_safetensors_header,
    json_damage,
)


class ConvNet(nn.Module):
    """A Conv2d, a 1x1 Conv2d and two Linear layers (one name with an underscore)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 4, 3, padding=1)
        self.pointwise = nn.Conv2d(4, 4, 1)
        self.proj_out = nn.Linear(4, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pointwise(torch.relu(self.conv_in(x))).mean((2, 3))
        return self.head(torch.relu(self.proj_out(x)))


INPUTS = (torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)),)
ADAPTED = ["conv_in", "pointwise", "proj_out"]


def _assert_refused(model: nn.Module, read: Callable[[], object], match: str) -> None:
    """``read`` raises a LoRAError naming ``match``, and leaves ``model`` bit-identical."""
    assert check_reader_contract(model, read, INPUTS) == "refused"
    with pytest.raises(LoRAError, match=re.escape(match)):
        read()


def _base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet()


def _trained() -> nn.Module:
    model = lp.add_lora(_base(), ADAPTED, rank=2, alpha=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ------------------------------------------------------------------------------- kohya


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory) -> Path:
    """A good kohya file of ``ConvNet`` (LoCon entries for the convolutions)."""
    pytest.importorskip("safetensors")
    return lp.export_kohya(_trained(), tmp_path_factory.mktemp("kohya") / "style.safetensors")


def _import_kohya_bytes(data: bytes, tmp: Path) -> str:
    path = tmp / "damaged.safetensors"
    path.write_bytes(data)
    return check_reader_contract(_base(), lambda: lp.import_kohya(_base(), path), INPUTS)


def test_kohya_good_file_loads(kohya_file):
    model = lp.import_kohya(_base(), kohya_file)
    assert check_reader_contract(model, lambda: None, INPUTS) == "loaded"
    assert lp.list_adapters(model) == ["default"]


@FUZZ
@given(damage=byte_damage())
def test_kohya_damaged_bytes(damage, kohya_file, tmp_path_factory):
    _import_kohya_bytes(damage(kohya_file.read_bytes()), tmp_path_factory.mktemp("b"))


@FUZZ
@given(damage=json_damage())
def test_kohya_damaged_header(damage, kohya_file, tmp_path_factory):
    try:
        data = damage_safetensors_header(kohya_file.read_bytes(), damage)
    except (TypeError, ValueError):
        return  # a value JSON cannot write (NaN is written; sets, ... never drawn)
    _import_kohya_bytes(data, tmp_path_factory.mktemp("h"))


def _tensor_damage() -> st.SearchStrategy[Callable[[Tensor], Tensor]]:
    """A function that damages one tensor: shape, dtype, length, or odd values."""
    reshapes = st.sampled_from(["flat", "extra_dim", "transpose", "truncate", "empty", "scalar"])
    dtypes = st.sampled_from([torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool])
    values = st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30])

    @st.composite
    def build(draw: st.DrawFn) -> Callable[[Tensor], Tensor]:
        kind = draw(st.sampled_from(["reshape", "dtype", "fill"]))
        how = draw(reshapes)
        dtype = draw(dtypes)
        value = draw(values)

        def damage(t: Tensor) -> Tensor:
            if kind == "dtype":
                return t.to(dtype)
            if kind == "fill":  # packed integer codes get the value cast (wrapped) to their dtype
                return torch.full(t.shape, value, dtype=torch.float64).to(t.dtype)
            flat = t.reshape(-1)
            return {
                "flat": flat,
                "extra_dim": t.unsqueeze(0),
                "transpose": t.reshape(t.shape[::-1]) if t.dim() else t,
                "truncate": flat[: max(0, flat.numel() - 1)],
                "empty": flat[:0],
                "scalar": flat[0] if flat.numel() else torch.tensor(1.0),
            }[how].clone()

        damage.__name__ = (
            f"{kind}:{how if kind == 'reshape' else dtype if kind == 'dtype' else value}"
        )
        return damage

    return build()


@FUZZ
@given(
    damage=_tensor_damage(),
    where=st.floats(0, 1, exclude_max=True),
    action=st.sampled_from(["damage", "damage", "delete", "add"]),
)
def test_kohya_damaged_tensors(damage, where, action, kohya_file):
    from safetensors.torch import load_file

    state = load_file(str(kohya_file))
    keys = sorted(state)
    key = keys[int(where * len(keys))]
    if action == "damage":
        state[key] = damage(state[key])
    elif action == "delete":
        del state[key]
    else:
        state[key.replace("lora_unet_", "lora_unet_x")] = state[key]
    check_reader_contract(_base(), lambda: lp.import_kohya(_base(), state), INPUTS)


@pytest.mark.parametrize("alpha", [0.0, -2.0, float("nan"), float("inf"), [1.0, 2.0]])
def test_kohya_bad_alpha_refused(alpha, kohya_file):
    from safetensors.torch import load_file

    state = load_file(str(kohya_file))
    state["lora_unet_proj_out.alpha"] = torch.tensor(alpha)
    model = _base()
    _assert_refused(model, lambda: lp.import_kohya(model, state), "lora_unet_proj_out.alpha")


# ------------------------------------------------------------------------------- packed states


def _quantized(method: str, seed: int) -> nn.Module:
    return lp.quantize_base(_base(seed), method=method)


def _packed_keys(state: dict[str, Tensor]) -> list[str]:
    return sorted(k for k in state if ".parametrizations.weight.original" in k)


def _damage_state(
    state: dict[str, Tensor], damage: Callable[[Tensor], Tensor], where: float, action: str
) -> dict[str, Tensor]:
    state = dict(state)
    keys = _packed_keys(state)
    key = keys[int(where * len(keys))]
    if action == "damage":
        state[key] = damage(state[key])
    elif action == "delete":
        del state[key]
    elif action == "extra":  # one more packed tensor than the layout has
        state[key.rpartition("original")[0] + "original9"] = state[key]
    else:  # "plain": the unpacked spelling next to the packed one
        state[key.rpartition(".parametrizations")[0] + ".weight"] = torch.zeros(3)
    return state


@pytest.fixture(scope="module")
def packed_states() -> dict[str, dict[str, Tensor]]:
    """The state dict of a packed model (another seed than the target's), per method."""
    return {m: _quantized(m, seed=5).state_dict() for m in ("nf4", "int8")}


@FUZZ
@given(
    method=st.sampled_from(["nf4", "int8"]),
    damage=_tensor_damage(),
    where=st.floats(0, 1, exclude_max=True),
    action=st.sampled_from(["damage", "damage", "delete", "extra", "plain"]),
    strict=st.booleans(),
)
def test_packed_state_dict_damaged(method, damage, where, action, strict, packed_states):
    state = _damage_state(packed_states[method], damage, where, action)
    model = _quantized(method, seed=0)
    check_reader_contract(model, lambda: model.load_state_dict(state, strict=strict), INPUTS)
    model = _quantized(method, seed=0)
    check_reader_contract(
        model, lambda: lp.load_base_state_dict(model, state, strict=strict), INPUTS
    )


@FUZZ
@given(
    method=st.sampled_from(["nf4", "int8"]),
    damage=_tensor_damage(),
    where=st.floats(0, 1, exclude_max=True),
    action=st.sampled_from(["damage", "damage", "delete", "extra", "object"]),
)
def test_plain_checkpoint_into_packed_damaged(method, damage, where, action):
    """``load_base_state_dict`` of a plain (unpacked) checkpoint into a packed model."""
    state = dict(_base(seed=5).state_dict())
    keys = sorted(state)
    key = keys[int(where * len(keys))]
    if action == "damage":
        state[key] = damage(state[key])
    elif action == "delete":
        del state[key]
    elif action == "object":  # not a tensor at all
        state[key] = [1.5]
    else:
        state[key.rpartition(".")[0] + ".extra"] = state[key]
    model = lp.add_lora(_quantized(method, seed=0), ADAPTED, rank=2)
    check_reader_contract(model, lambda: lp.load_base_state_dict(model, state), INPUTS)


@pytest.mark.parametrize("key", ["head.bias", "proj_out.weight"])
def test_plain_checkpoint_non_tensor_refused(key):
    state = {**_base(seed=5).state_dict(), key: [1.5]}
    model = lp.add_lora(_quantized("nf4", seed=0), ADAPTED, rank=2)
    _assert_refused(model, lambda: lp.load_base_state_dict(model, state), key)


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize(
    ("action", "match"),
    [
        ("delete", "are missing"),  # some packed tensors of a weight, not all
        ("extra", "original9"),  # a packed tensor the layout does not have
        ("plain", "load_base_state_dict"),  # a plain weight next to the packed ones
    ],
)
@pytest.mark.parametrize("strict", [True, False])
def test_packed_state_incomplete_refused(method, action, match, strict, packed_states):
    """Packed tensors that do not make one whole weight are refused before anything is copied
    (``load_state_dict`` would copy the rest, mixing two checkpoints in one model)."""
    state = _damage_state(packed_states[method], lambda t: t, 0.3, action)
    model = _quantized(method, seed=0)
    _assert_refused(model, lambda: model.load_state_dict(state, strict=strict), match)


# ------------------------------------------------------------------------------- Trainer


class _ResumingTrainer:
    """The Trainer's checkpoint reader (``LoRATrainer._load_from_checkpoint``) on a bare host:
    the hook is the mixin's, so transformers (slow to import) is not needed."""

    def __init__(self, model: nn.Module) -> None:
        from lora_param.interop.transformers import LoRATrainerMixin

        self.model = model
        self.resume = lambda folder: LoRATrainerMixin._load_from_checkpoint(self, str(folder))


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory) -> Path:
    """A ``checkpoint-<step>`` folder as LoRATrainer writes it (adapters only, no PEFT files)."""
    from lora_param.interop.transformers import save_adapters

    folder = tmp_path_factory.mktemp("run") / "checkpoint-10"
    return save_adapters(_trained(), folder, peft=False)


def _resume_target() -> nn.Module:
    return lp.add_lora(_base(), ADAPTED, rank=2)


def test_trainer_resume_good_checkpoint(trainer_checkpoint):
    model = _resume_target()
    _ResumingTrainer(model).resume(trainer_checkpoint.parent)
    assert check_reader_contract(model, lambda: None, INPUTS) == "loaded"


@FUZZ
@given(damage=byte_damage())
def test_trainer_resume_damaged_checkpoint(damage, trainer_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint-20")
    (folder / trainer_checkpoint.name).write_bytes(damage(trainer_checkpoint.read_bytes()))
    model = _resume_target()
    check_reader_contract(model, lambda: _ResumingTrainer(model).resume(folder), INPUTS)


def test_trainer_resume_truncated_checkpoint_names_the_file(trainer_checkpoint, tmp_path):
    (tmp_path / trainer_checkpoint.name).write_bytes(trainer_checkpoint.read_bytes()[:-40])
    model = _resume_target()
    _assert_refused(
        model, lambda: _ResumingTrainer(model).resume(tmp_path), trainer_checkpoint.name
    )


def test_trainer_resume_without_adapter_file(tmp_path):
    model = _resume_target()
    _assert_refused(
        model, lambda: _ResumingTrainer(model).resume(tmp_path), "has no lora_adapters.pt"
    )
