"""vLLM as the student's rollout engine (`rollout.engine: vllm`; extra `vllm`, CUDA only).

The same `Engine` interface as `HFEngine`: token-id prompts in, generations with the
sampler's log-probs out. vLLM is configured with `logprobs_mode="processed_logprobs"`,
so a recorded log-prob is the one of the distribution the token was drawn from (after
temperature and top-p), as `HFEngine` records (vLLM's default is the raw model output).
vLLM keeps its own copy of the student: call `push_weights` after every optimizer step
(the loop does), which loads the trainer's weights into each vLLM worker with
`LLM.collective_rpc` and the model's `load_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tropd.rollout.engine import Generation, SamplingParams, per_prompt


class VLLMEngine:
    """An in-process `vllm.LLM` sharing the GPU with the trainer (it takes
    `gpu_memory_utilization` of it); `llm_options` go to `vllm.LLM` unchanged."""

    def __init__(
        self,
        model: str,
        eos_token_id: int,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "auto",
        seed: int = 0,
        **llm_options,
    ):
        try:
            from vllm import LLM
        except ImportError:
            raise ValueError(
                "rollout.engine: vllm needs the vllm extra on a CUDA machine: "
                "pip install 'tropd[vllm]'"
            ) from None
        self.eos_token_id = eos_token_id
        self.llm = LLM(
            model=model,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            logprobs_mode="processed_logprobs",
            **llm_options,
        )

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Generation]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        per_row = per_prompt(params, len(prompts))
        sampling = [
            VLLMSamplingParams(
                max_tokens=p.max_new_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                logprobs=0,  # the sampled token's log-prob only
                stop_token_ids=[self.eos_token_id],
                seed=int(torch.randint(2**31, ())),  # reproducible from the step's seed
            )
            for p in per_row
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=False
        )
        results = []
        for output in outputs:
            sample = output.outputs[0]
            tokens = list(sample.token_ids)
            logprobs = [
                step[token].logprob for step, token in zip(sample.logprobs, tokens, strict=True)
            ]
            results.append(
                Generation(tokens, logprobs, bool(tokens) and tokens[-1] == self.eos_token_id)
            )
        return results

    def push_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load `(name, tensor)` pairs (Hugging Face names, e.g. the student's
        `named_parameters()`) into every vLLM worker."""
        self.llm.collective_rpc(_load_weights, args=(list(weights),))


def _load_weights(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside each vLLM worker (`collective_rpc` passes the worker first)."""
    worker.model_runner.model.load_weights(weights=weights)
