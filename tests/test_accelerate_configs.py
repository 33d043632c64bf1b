"""Every shipped accelerate config loads with Accelerate's own loader and says what it is for."""

import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "accelerate_configs"
EXPECTED = {
    "cpu.yaml": (DistributedType.NO, "no", 1),
    "single_gpu_fp16.yaml": (DistributedType.NO, "fp16", 1),
    "single_gpu_bf16.yaml": (DistributedType.NO, "bf16", 1),
    "ddp_2gpu_fp16.yaml": (DistributedType.MULTI_GPU, "fp16", 2),
    "multi_node_2x2_fp16.yaml": (DistributedType.MULTI_GPU, "fp16", 4),
    "fsdp_full_shard.yaml": (DistributedType.FSDP, "bf16", 2),
    "fsdp2.yaml": (DistributedType.FSDP, "bf16", 2),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, "fp16", 2),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, "fp16", 2),
    "deepspeed_zero2_cpu.yaml": (DistributedType.DEEPSPEED, "no", 2),
    "deepspeed_zero3_cpu.yaml": (DistributedType.DEEPSPEED, "no", 2),
}


def test_every_config_is_covered():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader(name):
    path = CONFIGS / name
    config = load_config_from_file(str(path))
    assert (config.distributed_type, config.mixed_precision, config.num_processes) == EXPECTED[name]
    assert path.read_text().startswith("# "), "each config opens with when to use it"
    if config.distributed_type == DistributedType.FSDP:
        fsdp = config.fsdp_config
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        if fsdp.get("fsdp_version", 1) == 2:  # FSDP2 always keeps the original parameters
            assert fsdp["fsdp_reshard_after_forward"] is True
        else:
            assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
            assert fsdp["fsdp_use_orig_params"] is True  # frozen base + LoRA in one shard
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == int(re.search(r"zero(\d)", name).group(1))
        # Clipping comes from the recipe (ftkit refuses a different explicit value).
        assert "gradient_clipping" not in config.deepspeed_config


def test_multi_node_config_launches_one_machine_of_two():
    """2 machines x 2 processes, static rendezvous on node 0's address (a placeholder to replace
    with --main_process_ip); tests/test_multinode.py launches it on loopback."""
    path = CONFIGS / "multi_node_2x2_fp16.yaml"
    config = load_config_from_file(str(path))
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 4, 0)
    assert (config.rdzv_backend, config.same_network, config.main_process_port) == (
        "static",
        True,
        29500,
    )
    assert config.main_process_ip and "--main_process_ip" in path.read_text()
