"""Heads masked per request inside a running vLLM engine, so a batch's plain and masked rows decode in one call.

Swapping the masked layers' `o_proj` weights (`VLLMBackend`'s other route) masks every row the engine holds: the plain
and the masked rows then take two engine calls of half the rows each, and each call's batch thins out as its rows stop
at EOS (`scripts/bench_vllm.py --routes`, batches of 16 prompts: one call of both, 174 tok/s; two calls, 152 tok/s).
Here each masked layer's `o_proj` gets a forward pre-hook that zeroes the masked heads' input features only in the
tokens of requests flagged with `MASKED_ARG`, which is what `mask_heads` does to the activations. Which tokens those are
is read at each step from the model runner: its batch's requests in order and `query_start_loc` (each request's
tokens in the flattened step).

Python hooks run at every step only in an eager engine (CUDA graphs replay without them) whose model runner lives in
this process (in-process or `external_launcher`, one device per engine): `RequestHeadMask.install` is
called only there, and reports whether it found every layer's `o_proj` (names as vLLM's model has them); otherwise
the backend swaps weights. The hooks read vLLM's V1 runner internals (`RUNNER_INTERNALS`); `install` declines a runner
without them (Model Runner V2, which `vllm_engine` does not select); a test decodes both routes against transformers.
"""

from __future__ import annotations

import numpy as np
import torch

MASKED_ARG = "trl_retmask_masked"
"""`SamplingParams.extra_args` key of a row decoded with the heads masked; its value names the heads (a fingerprint),
and is also the prompt's prefix-cache salt: a masked row never reuses KV blocks computed without (or with other)
heads masked."""

RUNNER_INTERNALS = ("input_batch", "requests", "query_start_loc")
"""What `_mark_tokens` reads of the model runner: vLLM's V1 runner (`vllm/v1/worker/gpu_model_runner.py`, which the
CPU runner subclasses) has them; Model Runner V2 has none."""

_ATTRIBUTE = "_trl_retmask_request_heads"  # where the installed mask lives on the worker


class RequestHeadMask:
    """The hooks of one engine call: a pre-hook on the model that marks the step's tokens of masked requests, and one
    on each masked layer's `o_proj` that zeroes those tokens' masked-head features."""

    def __init__(self, runner, columns: dict[str, torch.Tensor]):
        self.runner = runner
        self.tokens: torch.Tensor | None = None  # (tokens in this step, 1), True where the row is masked
        model = runner.get_model()
        modules = dict(model.named_modules())
        self.handles = [model.register_forward_pre_hook(self._mark_tokens, with_kwargs=True)]
        for name, drop in columns.items():
            self.handles.append(modules[name].register_forward_pre_hook(self._zeroer(drop.to(runner.device))))

    @classmethod
    def install(cls, worker, columns: dict[str, torch.Tensor]) -> bool:
        """`collective_rpc` target: hook the worker's model for `columns` ({`o_proj` module name: bool mask over its
        input features}). False (nothing installed) where the runner lacks `RUNNER_INTERNALS` or the model has no such
        module or another width: the backend swaps weights then."""
        runner = worker.model_runner
        if not all(hasattr(runner, name) for name in RUNNER_INTERNALS):
            return False  # not vLLM's V1 runner (V2: vllm/v1/worker/gpu/model_runner.py has none of them)
        modules = dict(runner.get_model().named_modules())
        for name, drop in columns.items():
            module = modules.get(name)
            if module is None or getattr(module, "input_size_per_partition", None) != drop.numel():
                return False
        cls.remove(worker)
        setattr(worker, _ATTRIBUTE, cls(runner, columns))
        return True

    @staticmethod
    def remove(worker) -> None:
        """`collective_rpc` target: take the hooks off (nothing to do when none are on)."""
        installed = getattr(worker, _ATTRIBUTE, None)
        if installed is not None:
            for handle in installed.handles:
                handle.remove()
            setattr(worker, _ATTRIBUTE, None)

    @staticmethod
    def hooked_modules(worker) -> list[str]:
        """`collective_rpc` target (tests): names of the worker's modules that carry forward pre-hooks."""
        return [name for name, m in worker.model_runner.get_model().named_modules() if m._forward_pre_hooks]

    def _mark_tokens(self, module, args, kwargs):
        runner = self.runner
        n = runner.input_batch.num_reqs
        flags = np.array([_is_masked(runner.requests[r]) for r in runner.input_batch.req_ids[:n]], dtype=bool)
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        if not flags.any():
            self.tokens = None
            return
        counts = np.diff(runner.query_start_loc.np[: n + 1])
        tokens = np.zeros(positions.shape[-1], dtype=bool)  # the step may be padded past its scheduled tokens
        tokens[: counts.sum()] = np.repeat(flags, counts)
        self.tokens = torch.from_numpy(tokens).to(positions.device)[:, None]

    def _zeroer(self, drop: torch.Tensor):
        def zero(module, args):
            if self.tokens is None:
                return None
            return (args[0].masked_fill(self.tokens & drop, 0), *args[1:])

        return zero


def _is_masked(request) -> bool:
    params = request.sampling_params
    return params is not None and bool((params.extra_args or {}).get(MASKED_ARG))


__all__ = ["MASKED_ARG", "RUNNER_INTERNALS", "RequestHeadMask"]
