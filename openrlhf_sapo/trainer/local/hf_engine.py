"""A Hugging Face `generate` rollout engine with the interface of OpenRLHF's vLLM rollout actor
(the counterpart of openrlhf/trainer/ray/vllm_engine.py's RolloutRayActor, for one process).

Upstream's agent executors (`SingleTurnAgentExecutor`: tokenisation, the VLM processor, prompt
truncation, the reward function; or a custom `--train.agent_func_path` executor) call
`await engine.generate(prompt_token_ids, sampling_params, multi_modal_data)` once per sample and
read a vLLM-shaped result (`outputs[0].token_ids / text / finish_reason / logprobs`). This engine
queues those calls and, once the event loop has nothing else to run, answers them with one
batched `generate` per set of sampling options, so a rollout of many prompts costs a few forward
passes, not one per sample.

The engine holds its own copy of the policy (fp32 on CPU, where it is faster than bf16; the
training dtype on a GPU) and `load_weights` copies the trained weights in after each step, as
upstream broadcasts them into vLLM. Sampling follows vLLM's options (temperature 0 is greedy;
top_k -1 is off; `processed_logprobs` are the log-probs after temperature / top-k / top-p).
A VLM's vision special tokens are never sampled (a sampled `<|image_pad|>` breaks every later
forward of that sequence).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ...utils.vlm_utils import vision_special_token_ids


@dataclass
class _Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    token_ids: List[int]
    text: str
    finish_reason: str
    logprobs: Optional[List[Dict[int, _Logprob]]] = None


@dataclass
class RequestOutput:
    outputs: List[CompletionOutput]


@dataclass
class _Request:
    prompt_token_ids: List[int]
    params: object
    images: list
    future: asyncio.Future = field(repr=False)


def _sampling_key(params) -> tuple:
    return (float(params.temperature), float(params.top_p), int(params.top_k), int(params.min_tokens or 0),
            params.logprobs is not None, bool(params.skip_special_tokens))


class HFRolloutEngine:
    """Batched HF `generate` behind vLLM's per-request interface (one process, one device)."""

    # Event-loop turns without a new request before a batch is sent (nested gathers in the
    # executors create their tasks over a few turns).
    QUIET_TURNS = 3

    def __init__(self, model, tokenizer, executor, processor=None, device: Optional[str] = None,
                 max_batch_size: int = 512):
        self.model = model.eval()
        self.tokenizer = tokenizer  # the text tokenizer (a VLM processor's inner one)
        self.processor = processor
        self.executor = executor
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.suppress_ids = vision_special_token_ids(processor) if processor is not None else []
        self._queue: List[_Request] = []
        self._flusher: Optional[asyncio.Task] = None
        self.generated_tokens = 0

    # ---------------------------------------------------------------- vLLM actor's interface

    async def generate_responses(self, prompt, label, sampling_params, max_length, hf_tokenizer,
                                 num_samples: int = 1, images=None):
        """N samples of one prompt, each through the agent executor (what RolloutRayActor does)."""
        return await asyncio.gather(*(
            self.executor.execute(prompt=prompt, label=label, sampling_params=sampling_params,
                                  max_length=max_length, hf_tokenizer=hf_tokenizer, llm_engine=self, images=images)
            for _ in range(num_samples)
        ))

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None) -> RequestOutput:
        loop = asyncio.get_running_loop()
        images = list((multi_modal_data or {}).get("image") or [])
        request = _Request(list(prompt_token_ids), sampling_params, images, loop.create_future())
        self._queue.append(request)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_when_quiet())
        return await request.future

    def get_num_unfinished_requests(self) -> int:
        return len(self._queue)

    # ---------------------------------------------------------------- weights

    @torch.no_grad()
    def load_weights(self, named_parameters) -> int:
        """Copy (name, tensor) pairs into the engine's model (dtype/device converted). Returns the count."""
        own = dict(self.model.named_parameters())
        count = 0
        for name, tensor in named_parameters:
            if name not in own:
                raise KeyError(f"rollout engine has no parameter {name!r} (a different architecture?)")
            own[name].copy_(tensor.detach().to(device=own[name].device, dtype=own[name].dtype))
            count += 1
        if count != len(own):
            raise ValueError(f"weight sync copied {count} of the rollout model's {len(own)} parameters")
        return count

    # ---------------------------------------------------------------- batching

    async def _flush_when_quiet(self) -> None:
        quiet, size = 0, -1
        while quiet < self.QUIET_TURNS:
            await asyncio.sleep(0)
            quiet = quiet + 1 if len(self._queue) == size else 0
            size = len(self._queue)
        batch, self._queue = self._queue, []
        groups: Dict[tuple, List[_Request]] = {}
        for request in batch:
            groups.setdefault(_sampling_key(request.params), []).append(request)
        for requests in groups.values():
            for start in range(0, len(requests), self.max_batch_size):
                chunk = requests[start : start + self.max_batch_size]
                try:
                    outputs = self._generate_batch(chunk)
                except Exception as err:  # every waiting request sees the error
                    for request in chunk:
                        request.future.set_exception(err)
                    continue
                for request, output in zip(chunk, outputs):
                    request.future.set_result(output)

    @torch.no_grad()
    def _generate_batch(self, requests: List[_Request]) -> List[RequestOutput]:
        params = requests[0].params
        limits = [int(r.params.max_tokens) for r in requests]
        width = max(len(r.prompt_token_ids) for r in requests)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        attention = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding
            ids[i, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            attention[i, width - len(r.prompt_token_ids):] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": attention.to(self.device)}
        inputs.update(self._vision_inputs(requests))

        greedy = params.temperature <= 0
        options = dict(do_sample=not greedy, max_new_tokens=max(limits), min_new_tokens=int(params.min_tokens or 0),
                       eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad, top_k=0, top_p=1.0,
                       return_dict_in_generate=True, output_scores=params.logprobs is not None)
        if not greedy:
            options.update(temperature=float(params.temperature), top_p=float(params.top_p),
                           top_k=max(int(params.top_k), 0))
        if self.suppress_ids:
            options["suppress_tokens"] = self.suppress_ids
        out = self.model.generate(**inputs, **options)
        tokens = out.sequences[:, width:].cpu()
        logprobs = None
        if params.logprobs is not None:
            scores = torch.stack(out.scores, 1).float().log_softmax(-1)  # processed log-probs [B, T, V]
            logprobs = scores.gather(-1, tokens.to(scores.device)[..., None])[..., 0].cpu()
        self.generated_tokens += int((tokens != pad).sum())
        return [self._completion(tokens[i], limits[i], params, None if logprobs is None else logprobs[i])
                for i in range(len(requests))]

    def _completion(self, tokens: torch.Tensor, limit: int, params, logprobs) -> RequestOutput:
        eos = self.tokenizer.eos_token_id
        ids = tokens.tolist()
        end = ids.index(eos) + 1 if eos in ids else len(ids)
        finish = "stop" if eos in ids[:end] else "length"
        if end > limit:
            end, finish = limit, "length"
        ids = ids[:end]
        text = self.tokenizer.decode(ids, skip_special_tokens=bool(params.skip_special_tokens))
        lp = None
        if logprobs is not None:
            lp = [{token: _Logprob(float(value))} for token, value in zip(ids, logprobs[:end].tolist())]
        return RequestOutput([CompletionOutput(ids, text, finish, lp)])

    # ---------------------------------------------------------------- VLM

    def _vision_inputs(self, requests: List[_Request]) -> dict:
        images = [image for r in requests for image in r.images]
        if not images:
            return {}
        if self.processor is None:
            raise ValueError("a rollout request has images but the engine has no processor (not a VLM?)")
        encoded = self.processor.image_processor(images=images, return_tensors="pt")
        return {key: value.to(self.device) for key, value in encoded.items()}
