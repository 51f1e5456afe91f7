"""LoRA training on PyTorch's own distributed engine: 2 CPU processes, gloo, loopback only.

One spawn (bounded in time) runs tests/ddp_worker.py on both ranks: save_merged's memory
(first, in the fresh processes), a DistributedDataParallel phase, an FSDP2 (``fully_shard``)
phase, then tests/sharded_worker.py's phases (a packed QLoRA base, merged export, every entry
point on a sharded model). The tests below check what the ranks recorded and
load what rank 0 saved into a single-process model.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lora_param import iter_lora, list_adapters, load_lora, lora_disabled, set_active_adapters

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ddp_worker.py, next to this file
import ddp_worker  # noqa: E402
import sharded_worker  # noqa: E402

WORLD = 2
TIMEOUT_S = 150


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    init_file = out / "rendezvous"
    ctx = mp.start_processes(
        ddp_worker.run,
        args=(WORLD, str(init_file), str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S}s")
    except mp.ProcessRaisedException:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error*.txt")))
        pytest.fail(f"a distributed worker failed:\n{errors}")
    finally:
        for proc in ctx.processes:  # only the processes this fixture started
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    results = [json.loads((out / f"result{r}.json").read_text()) for r in range(WORLD)]
    return out, results


def _fresh_outputs(out, adapter_file, outputs_file):
    model = ddp_worker.make_base()
    load_lora(model, out / adapter_file)
    model.eval()
    saved = torch.load(out / outputs_file, weights_only=True)
    with torch.no_grad():
        return model, model(saved["x"]), saved


def test_ddp_ranks_hold_identical_adapters_after_every_step(dist_run):
    _, results = dist_run
    for r in results:
        ddp = r["ddp"]
        assert all(ddp["identical_every_step"]), ddp["identical_every_step"]
        assert len(ddp["identical_every_step"]) == ddp_worker.STEPS + 1
        assert ddp["trained"]


def test_ddp_equals_single_process_training(dist_run):
    _, results = dist_run
    for r in results:
        assert r["ddp"]["max_diff_vs_single_process"] < 1e-5


def test_ddp_base_and_inactive_adapter_untouched(dist_run):
    """Frozen base, and a disabled adapter raises no 'unused parameters' error and stays as it was."""
    _, results = dist_run
    for r in results:
        assert r["ddp"]["base_unchanged"]
        assert r["ddp"]["spare_unchanged"]
        assert r["ddp"]["lora_off_equals_base"]


def test_ddp_rank0_adapter_loads_into_single_process_model(dist_run):
    out, _ = dist_run
    model, _, saved = _fresh_outputs(out, "ddp_adapter.pt", "ddp_outputs.pt")
    assert set(list_adapters(model)) == {"default", "spare"}
    # A file records no on/off state: load enables both; the workers ran with "spare" off.
    assert all(p.enabled for *_, p in iter_lora(model))
    set_active_adapters(model, "default")
    with torch.no_grad():
        assert torch.equal(model(saved["x"]), saved["on"])
    with torch.no_grad(), lora_disabled(model):
        assert torch.equal(model(saved["x"]), ddp_worker.make_base()(saved["x"]))


def test_ddp_rank0_peft_export_loads(dist_run):
    pytest.importorskip("safetensors")
    from lora_param.interop.peft import import_peft

    out, _ = dist_run
    model = import_peft(ddp_worker.make_base(), out / "ddp_peft").eval()
    saved = torch.load(out / "ddp_outputs.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(saved["x"]), saved["on"], rtol=1e-6, atol=1e-6)


def test_ddp_switching_adapters_after_wrapping_with_find_unused_parameters(dist_run):
    _, results = dist_run
    for r in results:
        assert r["toggle"] == {"completed": True, "b_frozen_after_switch": True, "identical": True}


def _fsdp2(results):
    r = results[0]["fsdp2"]
    if "skipped" in r:
        pytest.skip(r["skipped"])
    return [res["fsdp2"] for res in results]


def test_fsdp2_fully_shard_trains_like_single_process(dist_run):
    _, results = dist_run
    for r in _fsdp2(results):
        assert (
            r["sharded_type"] == "DTensor"
        )  # the base weight under the parametrization is sharded
        assert r["n_trainable"] == 6  # lora_A/B of the 3 enabled layers; base and "spare" frozen
        assert r["max_diff_vs_single_process"] < 1e-5
        assert r["eval_grad_enabled_max_diff"] < 1e-5
        assert r["lora_off_equals_base"]


def test_fsdp2_no_grad_evaluation_sees_trained_adapter(dist_run):
    """The no_grad weight cache must not serve W + BA from before training (FSDP2 all-gathers
    into the same storage without bumping version counters)."""
    _, results = dist_run
    for r in _fsdp2(results):
        assert r["eval_no_grad_max_diff"] < 1e-5


def test_fsdp2_gathered_adapter_loads_into_single_process_model(dist_run):
    out, results = dist_run
    _fsdp2(results)
    _, outputs, saved = _fresh_outputs(out, "fsdp2_adapter.pt", "fsdp2_outputs.pt")
    torch.testing.assert_close(outputs, saved["on"], rtol=1e-5, atol=1e-6)


def _tensors(path):
    payload = torch.load(path, weights_only=True)
    return json.loads(payload["config"]), payload["tensors"]


def test_fsdp2_save_lora_on_every_rank_writes_the_single_process_file(dist_run):
    """save_lora on the sharded model gathers the shards itself; rank 0 writes one file equal to
    the one single-process training on the same data writes (to float rounding)."""
    out, results = dist_run
    _fsdp2(results)
    config, tensors = _tensors(out / "fsdp2_adapter.pt")
    ref_config, ref_tensors = _tensors(out / "fsdp2_reference.pt")
    assert config == ref_config
    assert tensors.keys() == ref_tensors.keys()
    for key, value in ref_tensors.items():
        assert type(tensors[key]) is torch.Tensor and tensors[key].shape == value.shape
        torch.testing.assert_close(tensors[key], value, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_fsdp2_export_peft_on_every_rank_loads_into_a_plain_model(dist_run):
    pytest.importorskip("safetensors")
    from lora_param.interop.peft import import_peft

    out, results = dist_run
    _fsdp2(results)
    model = import_peft(ddp_worker.make_base(), out / "fsdp2_peft").eval()
    saved = torch.load(out / "fsdp2_outputs.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(saved["x"]), saved["on"], rtol=1e-5, atol=1e-6)


def test_fsdp2_load_lora_into_sharded_model_matches_plain(dist_run):
    _, results = dist_run
    for r in _fsdp2(results):
        assert r["sharded_load_max_diff"] < 1e-5


def test_fsdp2_merge_remove_and_add_on_shards_are_refused_without_change(dist_run):
    _, results = dist_run
    for r in _fsdp2(results):
        merge, remove, add, inject = r["refusals"]
        assert "merge_lora cannot change a sharded (FSDP2) model" in merge
        assert "remove_lora cannot change a sharded (FSDP2) model" in remove
        assert "add_lora cannot adapt sharded (FSDP2) weights" in add
        assert "add them before fully_shard" in inject
        assert r["unchanged_after_refusal"] and r["bare_has_no_adapter"]


def test_fsdp2_save_called_on_one_rank_only_says_so(dist_run):
    _, results = dist_run
    _fsdp2(results)
    message = results[0]["one_rank"]["message"]
    assert "is a collective: every rank must call it" in message
    assert "save_lora" in message


# ---- FSDP2 with a packed base, merged export, every entry point (tests/sharded_worker.py) ------


def _phase(results, name):
    if name not in results[0]:
        pytest.skip("torch.distributed.fsdp.fully_shard is not available in this torch")
    return [r[name] for r in results]


def _safetensors(folder):
    """Every tensor of a checkpoint folder (one file, or numbered files with an index)."""
    st = pytest.importorskip("safetensors.torch")
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return st.load_file(folder / "model.safetensors")
    tensors = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(st.load_file(folder / name))
    return tensors


def _assert_same(got, want, **tol):
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, msg=key, **(tol or {"rtol": 0, "atol": 0}))


def test_save_merged_of_8_layers_of_16_mb_grows_rank0_by_less_than_2_layers(dist_run):
    """FSDP2 model of 8 Linear layers of 16 MiB (float32 2048 x 2048), LoRA on each. Measured
    as the first phase of fresh processes, glibc mapping blocks of >= 1 MiB directly (RSS
    follows what is alive), peak reset just before the call.

    Rank 0 must hold one full weight at a time: the gathered layer, merged in that same
    buffer and written at once (~1.0 layer; the other 0.1 is the adapter factors, the file
    header and allocator slack). A second full copy anywhere (gathering through a staging
    buffer, an out-of-place merge, the whole state dict) would reach 2 layers: the bound. The
    lower bound shows the measurement sees the gathered layer at all. Rank 1 only sends its
    shards."""
    _, results = dist_run
    rank0, rank1 = _phase(results, "memory")
    if "unavailable" in rank0:
        pytest.skip(rank0["unavailable"])  # the platform cannot reset the RSS peak
    layer = rank0["layer_bytes"]
    assert layer >= 16 * 2**20
    assert rank0["held_bytes"] <= sharded_worker.BIG_LAYERS * layer // 2 + 2**20  # sharded
    assert 0.5 * layer < rank0["growth_bytes"] < 2 * layer, rank0
    assert rank1["growth_bytes"] < 0.25 * layer, rank1


def test_save_merged_of_8_layers_loads_into_the_plain_model(dist_run):
    out, results = dist_run
    if "unavailable" in _phase(results, "memory")[0]:
        pytest.skip(results[0]["memory"]["unavailable"])
    with torch.device("meta"):
        plain = torch.nn.Sequential(
            *(
                torch.nn.Linear(sharded_worker.BIG_WIDTH, sharded_worker.BIG_WIDTH, bias=False)
                for _ in range(sharded_worker.BIG_LAYERS)
            )
        )
    plain.load_state_dict(_safetensors(out / "big_merged"), assign=True)
    want = torch.load(out / "big_outputs.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(sharded_worker.big_input()), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("setup", sharded_worker.QLORA_SETUPS)
def test_qlora_fsdp2_shards_the_packed_base(dist_run, setup):
    """NF4 codes, scales and the double-quantization tensors are sharded: each rank holds half."""
    _, results = dist_run
    for r in _phase(results, "qlora"):
        run = r[setup]
        assert run["sharded"] == "DTensor"
        assert 0.45 < run["packed_local_bytes"] / run["packed_bytes"] < 0.55, run


@pytest.mark.parametrize("setup", sharded_worker.QLORA_SETUPS)
def test_qlora_fsdp2_loss_curve_equals_single_process(dist_run, setup):
    """6 AdamW steps on 2 ranks = one process seeing both ranks' batches (mean loss)."""
    _, results = dist_run
    for r in _phase(results, "qlora"):
        run = r[setup]
        assert len(run["losses"]) == sharded_worker.QLORA_STEPS
        assert run["losses"] == pytest.approx(run["reference_losses"], rel=1e-5, abs=1e-6)
        assert len(set(run["losses"])) > 1  # it trained
        assert run["eval_max_diff"] < 1e-5


@pytest.mark.parametrize("setup", sharded_worker.QLORA_SETUPS)
def test_qlora_fsdp2_save_lora_writes_the_single_process_file(dist_run, setup):
    out, results = dist_run
    _phase(results, "qlora")
    config, tensors = _tensors(out / f"qlora_{setup}.pt")
    ref_config, ref_tensors = _tensors(out / f"qlora_{setup}_ref.pt")
    assert config == ref_config
    _assert_same(tensors, ref_tensors, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setup", ["nf4", "int8"])
def test_qlora_fsdp2_load_lora_and_save_merged(dist_run, setup):
    """load_lora into a sharded packed model; save_merged writes the merged weights in the
    compute dtype, as the single process does, and they give the LoRA-on outputs."""
    out, results = dist_run
    for r in _phase(results, "qlora"):
        assert r[setup]["sharded_load_max_diff"] < 1e-5
    merged = _safetensors(out / f"qlora_{setup}_merged")
    _assert_same(merged, _safetensors(out / f"qlora_{setup}_ref_merged"), rtol=1e-5, atol=1e-6)
    assert all(t.dtype == torch.float32 for t in merged.values())
    plain = sharded_worker.make_qbase()
    plain.load_state_dict(merged)
    saved = torch.load(out / f"qlora_{setup}_outputs.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(saved["x"]), saved["on"], rtol=1e-5, atol=1e-5)


def test_save_merged_sharded_equals_single_process(dist_run):
    """A packed base with LoRA, DoRA, a trained head: the sharded export is the single-process
    one bit for bit, in one file or split, and loads into the plain model."""
    out, results = dist_run
    _phase(results, "merged")
    reference = _safetensors(out / "mixed_ref_merged")
    _assert_same(_safetensors(out / "mixed_merged"), reference)
    split = sorted(p.name for p in (out / "mixed_merged_split").iterdir())
    assert "model.safetensors.index.json" in split and len(split) > 2, split
    _assert_same(_safetensors(out / "mixed_merged_split"), reference)
    saved = torch.load(out / "mixed_outputs.pt", weights_only=True)
    plain = sharded_worker.make_qbase()
    with torch.no_grad():
        plain.load_state_dict(reference)
        torch.testing.assert_close(plain(saved["x"]), saved["on"], rtol=1e-5, atol=1e-5)
        plain.load_state_dict(_safetensors(out / "mixed_merged_d"))
        torch.testing.assert_close(plain(saved["x"]), saved["only_d"], rtol=1e-5, atol=1e-5)


def test_save_merged_failure_on_rank0_is_raised_on_every_rank(dist_run):
    out, results = dist_run
    first, second = _phase(results, "merged")
    assert first["failures"] == second["failures"]
    assert "it is a file, not a folder" in first["failures"][0]
    assert not [p.name for p in out.rglob(".*.tmp")]  # no temporary file left behind


def test_fsdp2_entry_points_refuse_with_the_fix_and_change_nothing(dist_run):
    _, results = dist_run
    expected = {
        "import_peft": "Import the adapter before fully_shard",
        "import_kohya": "Import the adapter before fully_shard",
        "combine_adapters": "Combine before fully_shard",
        "prepare_hotswap": "call prepare_hotswap before fully_shard",
        "quantize_base": "quantize the base first",
        "merge_lora": "call save_merged(model, folder) on every rank",
        "merged_state_dict": "save_merged(model, folder) on every rank",
        "packed_add_lora": "then add_lora, then fully_shard",
        "packed_quantize_base": "quantize the base first",
        "packed_dequantize_base": "save_merged(model, folder) on every rank",
        "packed_load_new": "add them before fully_shard",
    }
    for r in _phase(results, "entry_points"):
        for call, fix in expected.items():
            assert fix in r[call], (call, r[call])
        assert r["unchanged_after_refusals"]
        assert r["packed_adapters"] == ["default"]
        # gathered (plain tensors) after a forward, and still refused
        assert r["gathered_plain"] == "Parameter"
        assert "add_lora cannot adapt sharded (FSDP2) weights" in r["gathered_add_lora"]
        assert "save_merged(model, folder)" in r["gathered_merge_lora"]
        assert r["gathered_adapters"] == ["default", "b"]


def test_fsdp2_hotswap_mixed_batches_and_reload_are_exact(dist_run):
    """hotswap_lora (prepared before fully_shard) and mixed_adapters work on the sharded model;
    no cache serves values from before a swap or a load_lora."""
    _, results = dist_run
    for r in _phase(results, "entry_points"):
        assert r["mixed_max_diff"] < 1e-6
        assert r["hotswap_max_diff"] < 1e-6
        assert r["mixed_after_swap_max_diff"] < 1e-6
        assert r["load_after_eval_max_diff"] < 1e-6


def test_fsdp2_dora_writers_gather_the_magnitude(dist_run):
    """save_lora, export_peft and export_kohya of a sharded DoRA model write what one process
    writes: whole magnitudes, not one rank's shard."""
    st = pytest.importorskip("safetensors.torch")
    out, results = dist_run
    _phase(results, "entry_points")
    config, tensors = _tensors(out / "ep_dora.pt")
    ref_config, ref_tensors = _tensors(out / "ep_dora_ref.pt")
    assert config == ref_config
    _assert_same(tensors, ref_tensors)
    peft = st.load_file(out / "ep_dora_peft" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in peft)
    _assert_same(peft, st.load_file(out / "ep_dora_ref_peft" / "adapter_model.safetensors"))
    kohya = st.load_file(out / "ep_dora.safetensors")
    assert any(k.endswith("dora_scale") for k in kohya)
    _assert_same(kohya, st.load_file(out / "ep_dora_ref.safetensors"))


def test_fsdp2_pissa_exports_gather_factors_beside_the_start(dist_run):
    """PiSSA keeps its start as buffers (not sharded) beside sharded factors: export_kohya and
    save_merged write what one process writes."""
    st = pytest.importorskip("safetensors.torch")
    out, results = dist_run
    _phase(results, "entry_points")
    _assert_same(
        st.load_file(out / "ep_pissa.safetensors"), st.load_file(out / "ep_pissa_ref.safetensors")
    )
    _assert_same(_safetensors(out / "ep_pissa_merged"), _safetensors(out / "ep_pissa_ref_merged"))
