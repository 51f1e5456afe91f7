"""Worker for tests/test_distributed_trainer.py: LoRATrainer under accelerate on 2 CPU processes.

Started by ``torchrun --standalone --nproc-per-node 2 trainer_worker.py <engine> <out>``, where
``<engine>`` is ``fsdp2``, ``zero3`` or ``all`` (both, one after the other, in the same
processes: the imports are paid once; ``zero3`` only where DeepSpeed is installed):

* ``fsdp2``: accelerate's FSDP2 plugin, with ``SHARDED_STATE_DICT`` and ``FULL_STATE_DICT``;
  a gathered state dict handed to ``_save``; TRL's ``SFTTrainer`` with ``LoRATrainerMixin``;
  the set-ups LoRATrainer refuses; ``save_merged`` of a Llama sharded with ``fully_shard``.
* ``zero3``: DeepSpeed ZeRO-3 with every parameter partitioned (no persistence threshold).

Each run trains 4 steps with a checkpoint at step 2; a fresh model (other initial adapters)
then resumes from that checkpoint. Rank 0 records losses, file listings and refusals in
``out/<engine>/<engine>.json`` and the full adapter tensors each trained model ended with,
which the test compares with what was written. Any exception goes to ``out/error<rank>.txt``.

accelerate's launcher refuses FSDP on the CPU, and DeepSpeed on the CPU sees one process: this
harness sets accelerate's state up itself (:func:`fsdp2_on_cpu`, :func:`zero3_on_cpu`). The
library code that runs is the code that runs on GPUs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from lora_param import LoRAError, add_lora, lora_state_dict

STEPS = 4
VOCAB = 64


def fsdp2_on_cpu() -> None:
    """Let accelerate take an FSDP plugin on a CPU (gloo) job; on GPUs it does so by itself.

    ``AcceleratorState`` turns a multi-process job into FSDP only for accelerator devices; a
    CPU job is presented as one for that decision, then runs on the CPU as set up.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        shared = PartialState._shared_state
        if fsdp_plugin is not None and shared.get("distributed_type") == DistributedType.MULTI_CPU:
            shared["distributed_type"] = DistributedType.MULTI_GPU
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)

    AcceleratorState.__init__ = init


def zero3_on_cpu() -> None:
    """A DeepSpeed job on gloo: accelerate's state made before TrainingArguments, with gloo.

    Without an accelerator accelerate gives DeepSpeed no backend and counts one process.
    DeepSpeed's shared-memory collectives (a C++ extension built on first use) are left out:
    gloo does the communication. Called before each Trainer (a configured state takes one).
    """
    import deepspeed.comm.torch as ds_torch
    from accelerate.state import AcceleratorState, PartialState

    ds_torch.build_shm_op = lambda: None
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState(backend="gloo")


def make_base():
    """A tiny random Llama, the same on every call."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def make_model(seed: int):
    """The base with the trained adapters; ``seed`` sets their initial A (resume must load A)."""
    model = make_base()
    torch.manual_seed(seed)
    return add_lora(model, ["*.q_proj", "*.v_proj"], rank=2)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        self.ids = torch.randint(0, VOCAB, (n, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out: Path, **kw):
    import transformers

    return transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        lr_scheduler_type="linear",
        warmup_steps=1,
        logging_steps=1,
        save_steps=2,
        report_to=[],
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        **kw,
    )


#: What `accelerate launch` sets from the FSDP2 config file of docs/guides/distributed.md.
ACCELERATE_LAUNCH_FSDP2 = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_OFFLOAD_PARAMS": "false",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
    "FSDP_ACTIVATION_CHECKPOINTING": "false",
    "ACCELERATE_MIXED_PRECISION": "bf16",
}


def fsdp_config(state_dict_type: str) -> dict:
    return {
        "version": 2,
        "state_dict_type": state_dict_type,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
    }


def losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def full_adapters(model) -> dict[str, torch.Tensor]:
    """The adapter tensors, whole, on every rank (a collective on sharded or partitioned ones)."""
    from lora_param.core.distributed import gather_full
    from lora_param.interop.engine_state import gathered_adapters

    with gathered_adapters(model):
        return gather_full(lora_state_dict(model))


def train_and_resume(name: str, out: Path, build, record: dict, tensors: dict) -> object:
    """4 steps with a checkpoint at 2 and a final save; then a fresh model resumes at 2."""
    first = build(out / name / "run", seed=1)
    first.train()
    first.save_model(str(out / name / "final"))
    tensors[name] = full_adapters(first.model)
    again = build(out / name / "resumed", seed=2)
    again.train(resume_from_checkpoint=str(out / name / "run" / "checkpoint-2"))
    tensors[f"{name}_resumed"] = full_adapters(again.model)
    record[name] = {
        "losses": losses(first),
        "resumed_losses": losses(again),
        "checkpoint": listing(out / name / "run" / "checkpoint-2"),
        "final": listing(out / name / "final"),
    }
    return first


def fsdp2_phases(out: Path, record: dict, tensors: dict) -> None:
    from lora_param.interop.transformers import LoRATrainer

    fsdp2_on_cpu()
    for kind in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):

        def build(folder, seed, kind=kind):
            if kind == "SHARDED_STATE_DICT":  # as `accelerate launch --config_file` sets it up
                os.environ.update(ACCELERATE_LAUNCH_FSDP2)
                args = training_args(folder, use_cpu=True)
            else:  # through TrainingArguments
                args = training_args(folder, use_cpu=True, fsdp=True, fsdp_config=fsdp_config(kind))
            return LoRATrainer(model=make_model(seed), args=args, train_dataset=Tokens())

        trainer = train_and_resume(kind, out, build, record, tensors)
        for name in ACCELERATE_LAUNCH_FSDP2:
            os.environ.pop(name, None)
        record[kind]["mixed_precision"] = trainer.accelerator.mixed_precision
        record[kind]["sharded"] = type(
            trainer.model.model.layers[0].self_attn.q_proj.parametrizations.weight[0].lora_A
        ).__name__
        if kind == "FULL_STATE_DICT":
            # What Trainer.save_model hands _save under FULL_STATE_DICT: a gathered state dict
            # (rank 0 holds it), _save called on every rank.
            state = trainer.accelerator.get_state_dict(trainer.model)
            trainer._save(str(out / "from_state_dict"), state_dict=state)
            dist.barrier()  # rank 0 writes, the others return at once
            record["from_state_dict"] = listing(out / "from_state_dict")
            try:  # the model's own state dict holds shards: refused, not written
                trainer._save(str(out / "shards"), state_dict=trainer.model.state_dict())
            except LoRAError as exc:
                record["shards_refused"] = str(exc)
            record["shards_written"] = (out / "shards").exists()
    if importlib.util.find_spec("trl") is not None:
        trl_phase(out, record, tensors)
    refusals(out, record)
    merged_export(out, record)


def tiny_tokenizer():
    """A word-level tokenizer over "w0".."w59", built here (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(VOCAB - 4)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def trl_phase(out: Path, record: dict, tensors: dict) -> None:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from lora_param.interop.transformers import LoRATrainerMixin

    class LoRASFTTrainer(LoRATrainerMixin, SFTTrainer):
        pass

    g = torch.Generator().manual_seed(3)
    words = torch.randint(0, VOCAB - 4, (16, 7), generator=g).tolist()
    texts = [" ".join(f"w{i}" for i in row) for row in words]
    data = datasets.Dataset.from_dict({"text": texts})
    tokenizer = tiny_tokenizer()

    def build(folder, seed):
        args = SFTConfig(
            output_dir=str(folder),
            max_steps=STEPS,
            per_device_train_batch_size=2,
            learning_rate=5e-2,
            logging_steps=1,
            save_steps=2,
            report_to=[],
            seed=0,
            data_seed=0,
            disable_tqdm=True,
            bf16=False,
            use_cpu=True,
            max_length=16,
            fsdp=True,
            fsdp_config=fsdp_config("SHARDED_STATE_DICT"),
        )
        return LoRASFTTrainer(
            model=make_model(seed), args=args, train_dataset=data, processing_class=tokenizer
        )

    train_and_resume("trl", out, build, record, tensors)


def refusals(out: Path, record: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lora_param.interop.transformers import LoRATrainer

    messages = {}
    try:
        fsdp1 = {"version": 1, "sync_module_states": False}  # accelerate: no sync on the CPU
        args = training_args(out / "fsdp1", use_cpu=True, fsdp=True, fsdp_config=fsdp1)
        LoRATrainer(model=make_model(1), args=args, train_dataset=Tokens())
    except LoRAError as exc:
        messages["fsdp1"] = str(exc)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded = make_model(1)
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    os.environ.pop("ACCELERATE_USE_FSDP", None)  # set by accelerate for every later Accelerator
    try:
        args = training_args(out / "ddp", use_cpu=True)
        LoRATrainer(model=sharded, args=args, train_dataset=Tokens())
    except LoRAError as exc:
        messages["sharded_without_fsdp"] = str(exc)
    record["refusals"] = messages


def trained_model(seed: int = 1):
    """make_model with nonzero updates (B starts at zero), the same on every call."""
    model = make_model(seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model


def merged_export(out: Path, record: dict) -> None:
    """save_merged of a Llama sharded by hand (fully_shard): save_pretrained's layout."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lora_param import save_merged

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = trained_model()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    save_merged(model, out / "merged")  # every rank; rank 0 writes
    try:  # transformers' own save would gather parametrize keys: refused, saying what to use
        model.save_pretrained(str(out / "pretrained"))
    except LoRAError as exc:
        record["save_pretrained_sharded"] = str(exc)
    dist.barrier()
    record["merged"] = listing(out / "merged")
    record["pretrained_written"] = (out / "pretrained").exists()


def zero3_phases(out: Path, record: dict, tensors: dict) -> None:
    from lora_param.interop.transformers import ADAPTER_FILE, LoRATrainer

    config = {
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,  # partition even tiny adapters
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
    }

    def build(folder, seed):
        zero3_on_cpu()
        args = training_args(
            folder, deepspeed=config, accelerator_config={"use_configured_state": True}
        )
        return LoRATrainer(model=make_model(seed), args=args, train_dataset=Tokens())

    trainer = train_and_resume("zero3", out, build, record, tensors)
    lora_a = trainer.model.model.layers[0].self_attn.q_proj.parametrizations.weight[0].lora_A
    record["zero3"]["partitioned_numel"] = lora_a.numel()
    # DeepSpeed's consolidated state dict, as Trainer.save_model would hand it to _save
    state = trainer.accelerator.get_state_dict(trainer.deepspeed)
    trainer._save(str(out / "from_state_dict"), state_dict=state)
    dist.barrier()  # rank 0 writes, the others return at once
    record["from_state_dict"] = listing(out / "from_state_dict")
    # load_best_model_at_end's path: the step-2 adapters loaded into the partitioned model
    trainer._load_from_checkpoint(str(out / "zero3" / "run" / "checkpoint-2"))
    tensors["zero3_loaded_step2"] = full_adapters(trainer.model)
    record["step2_file"] = str(out / "zero3" / "run" / "checkpoint-2" / ADAPTER_FILE)
    from lora_param import save_merged

    try:  # the partitions are empty tensors here: refused, not written as such
        save_merged(trainer.model, out / "merged")
    except LoRAError as exc:
        record["save_merged_refused"] = str(exc)
    record["merged_written"] = (out / "merged").exists()


def main() -> None:
    engine, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    engines = ["fsdp2", "zero3"] if engine == "all" else [engine]
    if "zero3" in engines and importlib.util.find_spec("deepspeed") is None:
        engines.remove("zero3")
    try:
        for name in engines:  # one process for both: the imports are paid once
            folder = out / name
            folder.mkdir(exist_ok=True)
            record: dict = {}
            tensors: dict = {}
            (fsdp2_phases if name == "fsdp2" else zero3_phases)(folder, record, tensors)
            dist.barrier()
            if rank == 0:
                torch.save(tensors, folder / f"{name}_tensors.pt")
                (folder / f"{name}.json").write_text(json.dumps(record))
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
