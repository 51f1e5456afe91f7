"""LoRA+: ``lora_plus_param_groups`` gives PEFT 0.21's ``create_loraplus_optimizer`` groups, for
any torch optimizer, and ``LoRATrainer(loraplus_ratio=...)`` trains with them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_param as lp
from lora_param import LoRAError


class Net(nn.Module):
    """An embedding, a Linear, a Conv, a LayerNorm and a head: every group PEFT forms."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.emb(i))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.ln(h))


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _ours(**kw) -> nn.Module:
    return lp.add_lora(_net(), ["emb", "fc", "conv"], rank=2, trainable=["ln", "head"], **kw)


def _our_keys(model: nn.Module) -> dict[int, str]:
    """A name for each adapter tensor, as PEFT names the same one."""
    peft_name = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_magnitude": "lora_magnitude_vector"}
    keys = {}
    for path, _, _, p in lp.iter_lora(model):
        module = path.rpartition(".")[0]
        for name, t in p.trainable_tensors().items():
            key = peft_name[name]
            if p.kind == "embedding":  # PEFT's embedding A / B are our B / A, transposed
                key = {"lora_A": "lora_embedding_B", "lora_B": "lora_embedding_A"}.get(key, key)
            keys[id(t)] = f"{module}.{key}"
    for path, _, _, c in lp.iter_copies(model):
        keys[id(c.value)] = path
    return keys


def _peft_key(name: str) -> str:
    for part in ("base_model.model.", ".modules_to_save.default", ".base_layer"):
        name = name.replace(part, "")
    return name.replace(".default.weight", "").replace(".default", "")


def _settings(groups, keys: dict[int, str]) -> dict[str, tuple[float, float]]:
    return {keys[id(t)]: (g["lr"], g["weight_decay"]) for g in groups for t in g["params"]}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("dora", [False, True])
def test_groups_are_peft_create_loraplus_optimizer_groups(dora, bias):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    config = peft.LoraConfig(
        r=2, target_modules=["emb", "fc", "conv"], modules_to_save=["ln", "head"],
        use_dora=dora, bias=bias,
    )  # fmt: skip
    theirs = peft.get_peft_model(_net(), config)
    optimizer = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8, loraplus_weight_decay=0.1,
        loraplus_lr_embedding=1e-5,
    )  # fmt: skip
    peft_keys = {id(t): _peft_key(n) for n, t in theirs.named_parameters()}
    want = _settings(optimizer.param_groups, peft_keys)

    ours = _ours(use_dora=dora, bias=bias)
    groups = lp.lora_plus_param_groups(ours, 1e-3, 8, lr_embedding=1e-5, weight_decay=0.1)
    got = _settings(groups, _our_keys(ours))
    if dora:
        # PEFT stores a conv's DoRA magnitude (1, out, 1) and its ndim == 1 rule misses it;
        # here every magnitude is a vector and learns at B's rate.
        assert want.pop("conv.lora_magnitude_vector") == (1e-3, 0.1)
        assert got.pop("conv.lora_magnitude_vector") == (8e-3, 0.1)
    assert got == want
    # every trainable parameter is in exactly one group
    flat = [id(t) for g in groups for t in g["params"]]
    assert sorted(flat) == sorted({id(t) for t in ours.parameters() if t.requires_grad})
    torch.optim.AdamW(groups, lr=1e-3).step()  # any torch optimizer takes them


def test_b_learns_ratio_times_faster_with_plain_sgd():
    model = _ours()
    x = torch.randint(0, 10, (4, 5))
    with torch.no_grad():  # B starts at zero: give A and B values so both get gradients
        for p in lp.adapter_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
    fc = model.fc.parametrizations.weight[0]
    before = {n: t.detach().clone() for n, t in fc.trainable_tensors().items()}
    model(x).sum().backward()
    grads = {n: t.grad.clone() for n, t in fc.trainable_tensors().items()}
    torch.optim.SGD(lp.lora_plus_param_groups(model, lr=0.1, ratio=4), lr=0.1).step()
    for name, lr in (("lora_A", 0.1), ("lora_B", 0.4)):
        step = before[name] - fc.trainable_tensors()[name].detach()
        torch.testing.assert_close(step, lr * grads[name])


def test_one_adapter_and_refusals():
    model = _ours(adapter="a")
    lp.add_lora(model, ["fc"], rank=2, adapter="b")
    b_only = lp.lora_plus_param_groups(model, 1e-3, adapter="b")
    assert sorted(id(t) for g in b_only for t in g["params"]) == sorted(
        id(t) for t in lp.adapter_parameters(model, "b")
    )
    assert [g["lr"] for g in b_only] == [1e-3, 16e-3]
    for kwargs, match in (
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"lr": 1e-3, "ratio": -1}, "ratio must be a positive number"),
        ({"lr": 1e-3, "lr_embedding": True}, "lr_embedding must be"),
        ({"lr": 1e-3, "adapter": "c"}, "c"),
    ):
        with pytest.raises(LoRAError, match=match):
            lp.lora_plus_param_groups(model, **kwargs)
    with pytest.raises(LoRAError, match="no adapters"):
        lp.lora_plus_param_groups(_net(), 1e-3)
    lp.disable_lora(model)  # disabled adapters are frozen: nothing trains
    with pytest.raises(LoRAError, match="nothing in this model trains"):
        lp.lora_plus_param_groups(copy.deepcopy(model), 1e-3)


class _Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, i: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = self.net(i).mean(dim=(1, 2))
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}


def test_lora_trainer_builds_the_loraplus_optimizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lora_param import LoRATrainer

    model = lp.add_lora(_Regression(), ["*.emb", "*.fc", "*.conv"], rank=2, trainable="*.head")
    g = torch.Generator().manual_seed(0)
    data = [{"i": torch.randint(0, 10, (5,), generator=g), "labels": torch.randn(())} for _ in range(4)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        weight_decay=0.01, optim="adamw_torch", save_strategy="no", use_cpu=True, report_to=[],
        disable_tqdm=True,
    )  # fmt: skip
    trainer = LoRATrainer(model=model, args=args, train_dataset=data, loraplus_ratio=16)
    trainer.train()
    groups = trainer.optimizer.param_groups
    want = lp.lora_plus_param_groups(
        model, 1e-3, 16, lr_embedding=1e-6, weight_decay=0.01
    )
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [
        (g["lr"], g["weight_decay"]) for g in want
    ]
    assert [[id(t) for t in g["params"]] for g in groups] == [
        [id(t) for t in g["params"]] for g in want
    ]
    assert isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)

    own = torch.optim.SGD(lp.adapter_parameters(model), lr=0.1)
    with pytest.raises(LoRAError, match="either loraplus_ratio= or optimizers="):
        LoRATrainer(model=model, args=args, train_dataset=data, loraplus_ratio=16,
                    optimizers=(own, None))  # fmt: skip
    with pytest.raises(LoRAError, match="loraplus_ratio must be a positive number"):
        LoRATrainer(model=model, args=args, train_dataset=data, loraplus_ratio=0)
