"""Known warnings of dependencies that a user of this package can do nothing about, filtered where they are issued.

Each filter names the warning's text and the module that issues it, so the same warning from anywhere else, and
every other warning, still shows. A warning that says something about the user's run is never filtered.
"""

from __future__ import annotations

import warnings

DEPENDENCY_NOISE = (
    # vLLM 0.31 on the CPU scans every loaded module's globals when it registers its Triton kernel overrides
    # (vllm/triton_utils/dispatcher.py:125-139, from vllm/platforms/cpu.py:666 at engine start); `hasattr` on
    # torch's deprecated `torch.distributed.reduce_op` object trips its deprecation
    # (torch/distributed/distributed_c10d.py:551-560). Nothing uses `reduce_op`.
    (r"`torch\.distributed\.reduce_op` is deprecated", FutureWarning, r"vllm\.triton_utils\.dispatcher"),
    # TRL 1.16 calls the model's `is_gradient_checkpointing`, `gradient_checkpointing_disable` and
    # `gradient_checkpointing_enable` (trl/models/utils.py:136-154 and :407-414, e.g. around the reference
    # log-probs of `precompute_ref_log_probs`), which transformers 5.23 renamed to `*activation_checkpointing*`
    # and deprecated (transformers/modeling_utils.py:3202-3319 in 5.25). This package calls the new names
    # (trl_retmask/checkpointing.py).
    (
        r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is deprecated "
        r"and will be removed in v6",
        FutureWarning,
        r"transformers\.modeling_utils",
    ),
)
"""(message regex, category, issuing module regex) of each filtered warning."""


def filter_dependency_noise() -> None:
    """Ignore the warnings in `DEPENDENCY_NOISE` (added in front of the current filters; idempotent)."""
    for message, category, module in DEPENDENCY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
