"""transformers end to end: save_pretrained/from_pretrained, LoRATrainer checkpoints and resume,
final saves (adapters, PEFT folder, merged), gradient checkpointing. Tiny random models, CPU,
offline."""

from __future__ import annotations

import pytest
import torch

from lora_param import LoRAError, add_lora, import_peft, iter_lora, load_lora, lora_state_dict

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _mixtral():
    cfg = transformers.MixtralConfig(
        num_local_experts=4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        vocab_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    if not hasattr(model.model.layers[0].mlp.experts, "gate_up_proj"):
        pytest.skip("3-D expert tensors need transformers >= 5")
    return model


MODELS = {
    "llama": (_llama, ["*.q_proj", "*.v_proj"]),
    "mixtral": (_mixtral, ["*.q_proj", "*.experts.*_proj"]),
}


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _args(out, steps: int, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        lr_scheduler_type="linear",
        warmup_steps=1,
        logging_steps=1,
        save_steps=2,
        save_strategy="steps",
        use_cpu=True,
        report_to=[],
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kw,
    )


class _Stop(transformers.TrainerCallback):
    """Stops training after step 2, as an interruption would."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == 2


def _losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_trainer_checkpoint_resume_and_final_saves(tmp_path, family):
    from lora_param.interop.transformers import ADAPTER_FILE, LoRATrainer

    build, targets = MODELS[family]
    # uninterrupted: 4 steps
    full = add_lora(build(), targets, rank=2)
    trainer = LoRATrainer(model=full, args=_args(tmp_path / "full", 4), train_dataset=_Tokens())
    trainer.train()
    want = _losses(trainer)

    # interrupted after the checkpoint at step 2, then a fresh model resumes to step 4
    first = add_lora(build(), targets, rank=2)
    LoRATrainer(
        model=first, args=_args(tmp_path / "run", 4), train_dataset=_Tokens(), callbacks=[_Stop()]
    ).train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {ADAPTER_FILE, "optimizer.pt", "scheduler.pt", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # not the base
    assert any(f.startswith("rng_state") for f in files)
    resumed_model = add_lora(build(), targets, rank=2)
    resumed = LoRATrainer(
        model=resumed_model, args=_args(tmp_path / "run", 4), train_dataset=_Tokens()
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert _losses(resumed)[-2:] == pytest.approx(want[2:], rel=1e-6)
    for (k, a), b in zip(
        lora_state_dict(full).items(), lora_state_dict(resumed_model).values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=k)
    resumed.state.best_model_checkpoint = str(ckpt)  # load_best_model_at_end's hook
    resumed._load_best_model()
    for (k, a), b in zip(
        lora_state_dict(first).items(), lora_state_dict(resumed_model).values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=k)

    # final saves: adapters alone (load_lora, PEFT) and the merged model (from_pretrained)
    full.eval()
    with torch.no_grad():
        expected = full(_ids()).logits
    trainer.save_model(str(tmp_path / "final"))
    reloaded = load_lora(build().eval(), tmp_path / "final" / ADAPTER_FILE)
    via_peft = import_peft(build().eval(), tmp_path / "final")
    full.save_pretrained(str(tmp_path / "merged"))
    assert list(iter_lora(full))  # save_pretrained left the model's adapters in place
    merged = type(full).from_pretrained(str(tmp_path / "merged")).eval()
    assert not any("lora" in k or "parametrizations" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, expected)
        torch.testing.assert_close(via_peft(_ids()).logits, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged(_ids()).logits, expected, atol=1e-5, rtol=1e-4)


def test_save_pretrained_refuses_parametrized_state_dict(tmp_path):
    model = add_lora(_llama(), "*.q_proj", rank=2)
    with pytest.raises(LoRAError, match="merged_state_dict"):
        model.save_pretrained(str(tmp_path / "x"), state_dict=model.state_dict())
    assert not (tmp_path / "x").exists()


def test_save_pretrained_without_state_dict_parameter_refuses(tmp_path):
    class _Saver(torch.nn.Module):  # diffusers' ModelMixin.save_pretrained takes no state_dict
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def save_pretrained(self, save_directory, **kwargs):
            torch.save(self.state_dict(), f"{save_directory}.pt")

    model = _Saver()
    model.save_pretrained(str(tmp_path / "plain"))  # no LoRA: the class's own method
    add_lora(model, "fc", rank=2)
    with pytest.raises(LoRAError, match="merge_lora"):
        model.save_pretrained(str(tmp_path / "x"))
    assert not (tmp_path / "x.pt").exists()


def test_lora_trainer_needs_adapters(tmp_path):
    from lora_param.interop.transformers import LoRATrainer

    with pytest.raises(LoRAError, match="add_lora"):
        LoRATrainer(model=_llama(), args=_args(tmp_path, 1), train_dataset=_Tokens())


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_keeps_adapter_gradients(reentrant):
    for build, targets in MODELS.values():
        model = add_lora(build(), targets, rank=2)
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        with torch.no_grad():
            for *_, p in iter_lora(model):
                p.lora_B.normal_(std=0.1)
        model(_ids(), labels=_ids()).loss.backward()
        grads = [p.lora_A.grad for *_, p in iter_lora(model)]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


def _state_dict_name(model, tensor) -> str:
    return next(n for n, t in model.named_parameters() if t is tensor)


def _adapter_keys(model) -> dict[str, str]:
    """Key in the adapter file -> key in the model's state dict, for every adapter tensor."""
    keys = {}
    for path, _, _, p in iter_lora(model):
        for factor in ("lora_A", "lora_B"):
            keys[f"{p.adapter}.{path}.{factor}"] = _state_dict_name(model, getattr(p, factor))
    return keys


@pytest.mark.parametrize("prefix", ["", "module."])
def test_save_takes_adapters_from_the_state_dict_it_is_given(tmp_path, prefix):
    """Trainer hands _save a gathered state dict under FSDP FULL_STATE_DICT and DeepSpeed: the
    adapters are read from it (here: other values than the model's), in both formats."""
    from lora_param.interop.transformers import ADAPTER_FILE, LoRATrainer

    model = add_lora(_llama(), ["*.q_proj", "*.v_proj"], rank=2)
    trainer = LoRATrainer(model=model, args=_args(tmp_path / "run", 1), train_dataset=_Tokens())
    keys = _adapter_keys(model)
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    gathered = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    want = {k: torch.randn(v.shape, generator=g) for k, v in before.items()}
    for key, name in keys.items():
        gathered[prefix + name] = want[key]
    trainer._save(str(tmp_path / "out"), state_dict=gathered)
    written = torch.load(tmp_path / "out" / ADAPTER_FILE, weights_only=True)["tensors"]
    for key, value in want.items():
        assert torch.equal(written[key], value), key
    for key, value in lora_state_dict(model).items():  # the model keeps its own parameters
        assert torch.equal(value, before[key]), key
    expected = load_lora(_llama().eval(), tmp_path / "out" / ADAPTER_FILE)
    via_peft = import_peft(_llama().eval(), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(via_peft(_ids()).logits, expected(_ids()).logits)


def test_save_from_state_dict_with_partitioned_adapters(tmp_path):
    """DeepSpeed ZeRO-3 leaves empty parameters on each rank (the 40-byte adapters of PEFT's
    reports): the gathered state dict must hold them; one it lacks is refused, nothing written."""
    from lora_param.interop.transformers import ADAPTER_FILE, LoRATrainer

    model = add_lora(_llama(), "*.q_proj", rank=2)
    trainer = LoRATrainer(model=model, args=_args(tmp_path / "run", 1), train_dataset=_Tokens())
    full = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(p for *_, p in iter_lora(model))
    a = first.lora_A
    a.ds_numel, a.ds_shape, a.ds_id = a.numel(), tuple(a.shape), 0  # as ZeRO-3 marks it
    a.data = torch.empty(0)
    try:
        trainer._save(str(tmp_path / "out"), state_dict=full)
        written = torch.load(tmp_path / "out" / ADAPTER_FILE, weights_only=True)["tensors"]
        key = next(k for k in written if k.endswith(".lora_A"))
        name = _state_dict_name(model, a)
        assert written[key].shape == a.ds_shape and torch.equal(written[key], full[name])
        lacking = {k: v for k, v in full.items() if k != name}
        with pytest.raises(LoRAError, match="holds only a shard"):
            trainer._save(str(tmp_path / "lacking"), state_dict=lacking)
        assert not (tmp_path / "lacking").exists()
        wrong = {**full, name: torch.zeros(3, 3)}
        with pytest.raises(LoRAError, match=r"has shape \(3, 3\)"):
            trainer._save(str(tmp_path / "wrong"), state_dict=wrong)
        assert not (tmp_path / "wrong").exists()
    finally:
        del a.ds_numel, a.ds_shape, a.ds_id


def test_resume_from_a_whole_model_fsdp_checkpoint_says_so(tmp_path):
    from lora_param.interop.transformers import LoRATrainer

    model = add_lora(_llama(), "*.q_proj", rank=2)
    trainer = LoRATrainer(model=model, args=_args(tmp_path / "run", 1), train_dataset=_Tokens())
    (tmp_path / "checkpoint-2" / "pytorch_model_fsdp_0").mkdir(parents=True)
    with pytest.raises(LoRAError, match="whole-model FSDP checkpoint"):
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint-2"))


def test_mixin_gives_any_trainer_subclass_adapter_checkpoints(tmp_path):
    """LoRATrainerMixin on a Trainer subclass (as with TRL's SFTTrainer), from lora_param."""
    import lora_param.interop.transformers as hf

    class MyTrainer(transformers.Trainer):
        pass

    class LoRAMyTrainer(hf.LoRATrainerMixin, MyTrainer):
        pass

    model = add_lora(_llama(), "*.q_proj", rank=2)
    trainer = LoRAMyTrainer(model=model, args=_args(tmp_path / "run", 2), train_dataset=_Tokens())
    trainer.train()
    files = {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert {hf.ADAPTER_FILE, "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    with pytest.raises(LoRAError, match="add_lora"):
        LoRAMyTrainer(model=_llama(), args=_args(tmp_path / "x", 1), train_dataset=_Tokens())
