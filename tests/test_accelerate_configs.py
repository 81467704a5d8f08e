"""Every accelerate YAML in recipes/accelerate loads with accelerate's own loader and launches the intended set-up."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"

# file -> (distributed type, number of processes, extra environment the launcher must set)
EXPECTED = {
    "single_gpu.yaml": (DistributedType.NO, 1, {}),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, {}),
    "zero1.yaml": (
        DistributedType.DEEPSPEED,
        4,
        {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"},
    ),
    "zero2.yaml": (
        DistributedType.DEEPSPEED,
        4,
        {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    ),
    "zero3.yaml": (
        DistributedType.DEEPSPEED,
        8,
        {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
            "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
            "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
        },
    ),
    "fsdp2.yaml": (
        DistributedType.FSDP,
        8,
        {
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": "2",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_ACTIVATION_CHECKPOINTING": "false",
        },
    ),
}


def test_every_shipped_yaml_is_covered():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


def _launch_env(path: Path):
    """What `accelerate launch --config_file path` resolves, without starting processes (as launch_command does)."""
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return args, env


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_yaml_loads_with_accelerate(name):
    dist_type, num_processes, expected_env = EXPECTED[name]
    config = load_config_from_file(str(CONFIG_DIR / name))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == dist_type
    assert config.num_processes == num_processes
    assert config.mixed_precision == "bf16"
    assert config.parallelism_config == {}  # no context parallelism: TRL's DPO loss cannot shard a sequence

    args, env = _launch_env(CONFIG_DIR / name)
    assert args.num_processes == num_processes
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in expected_env.items():
        assert env.get(key) == value, (key, env.get(key))
    # gradient accumulation is left to the training arguments ("auto"), never pinned in the YAML
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env


@pytest.mark.parametrize("name", ["zero1.yaml", "zero2.yaml", "zero3.yaml"])
def test_deepspeed_plugin_builds_from_yaml(name, monkeypatch):
    """The plugin the training processes would build from the launcher's environment (no deepspeed needed)."""
    from accelerate.utils import DeepSpeedPlugin

    _, env = _launch_env(CONFIG_DIR / name)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    stage = int(EXPECTED[name][2]["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    assert plugin.zero_stage == stage
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)


def test_fsdp2_plugin_builds_from_yaml(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    _, env = _launch_env(CONFIG_DIR / "fsdp2.yaml")
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.activation_checkpointing is False  # the trainer's gradient checkpointing does it
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
