"""Generation backends: vLLM (GPU) and Hugging Face `generate` (CPU, or GPU without vLLM).

Both render prompts the same way (`render_prompt`): the row's prompt becomes one user message (after
an optional system message), split at every ``<image>`` into image and text items when the row has
images, and the model's chat template is applied with the generation prompt added — on the processor
for a VLM (which turns each image item into the model's image placeholder), on the tokenizer
otherwise. The rendered text already holds the template's special tokens, so it is tokenized without
adding any (no second BOS).

A backend's `generate(examples)` returns, per example, `n` `Generation`s (text without special
tokens, number of generated tokens, whether it stopped at `max_new_tokens`).
"""

from __future__ import annotations

import base64
import io
import os
import sys
from dataclasses import dataclass
from typing import Optional

from openrlhf_sapo.eval.benchmarks import IMAGE_TAG, Example
from openrlhf_sapo.utils.vlm_utils import is_vlm_config

BACKENDS = ("auto", "vllm", "hf")


class GenerationSetupError(RuntimeError):
    """The model or backend cannot be used as asked (message says why and what to do)."""


@dataclass
class GenerationConfig:
    temperature: float = 0.6
    top_p: float = 0.95
    n_samples: int = 1
    max_new_tokens: int = 2048
    seed: int = 0
    system_prompt: Optional[str] = None
    chat_template: bool = True
    dtype: str = "auto"
    device: Optional[str] = None  # hf only; default cuda if available else cpu
    tensor_parallel_size: int = 1  # vllm only
    gpu_memory_utilization: float = 0.85  # vllm only
    max_model_len: Optional[int] = None  # vllm only
    trust_remote_code: bool = False


@dataclass
class Generation:
    text: str
    num_tokens: Optional[int] = None
    truncated: Optional[bool] = None


# --------------------------------------------------------------------------------------------
# Prompts and images


def build_messages(example: Example, system_prompt: Optional[str] = None, content_items: bool = False) -> list:
    """Chat messages of one row: [system], user. With images (or for a VLM's template) the user content is a
    list of items, `{"type": "image"}` where each `<image>` tag was, text items stripped of surrounding
    whitespace; otherwise the prompt text itself."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    if example.images or content_items:
        content = []
        parts = example.prompt.split(IMAGE_TAG)
        for i, part in enumerate(parts):
            if i > 0:
                content.append({"type": "image"})
            if part.strip():
                content.append({"type": "text", "text": part.strip()})
        messages.append({"role": "user", "content": content})
    else:
        messages.append({"role": "user", "content": example.prompt})
    return messages


def _has_chat_template(owner) -> bool:
    if getattr(owner, "chat_template", None):
        return True
    tok = getattr(owner, "tokenizer", None)
    return bool(tok is not None and getattr(tok, "chat_template", None))


def render_prompt(owner, example: Example, config: GenerationConfig, content_items: bool = False) -> str:
    """The text fed to the model for one row (see the module docstring)."""
    if not config.chat_template:
        if example.images:
            raise GenerationSetupError(
                f"row {example.id!r} has images, which need the model's chat template (it places the image "
                "tokens); drop --no-chat-template"
            )
        return (config.system_prompt + "\n\n" if config.system_prompt else "") + example.prompt
    if not _has_chat_template(owner):
        raise GenerationSetupError(
            "the model's tokenizer/processor has no chat template; pass --no-chat-template to feed the "
            "prompts as raw text (base models)"
        )
    messages = build_messages(example, config.system_prompt, content_items=content_items)
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_image(ref: str, example: Example):
    """A row's image (path or data: URI) as an RGB PIL image; errors name the row."""
    from PIL import Image

    try:
        if ref.startswith("data:"):
            data = base64.b64decode(ref.split(",", 1)[1], validate=False)
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        with Image.open(ref) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        what = ref if not ref.startswith("data:") else ref[:40] + "..."
        raise GenerationSetupError(f"row {example.id!r}: cannot open image {what}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------
# Backends


def choose_backend(requested: str = "auto") -> str:
    """`auto`: vllm when CUDA is available and vllm imports, else hf."""
    if requested not in BACKENDS:
        raise GenerationSetupError(f"unknown backend {requested!r} (expected one of {', '.join(BACKENDS)})")
    if requested != "auto":
        return requested
    try:
        import torch

        if not torch.cuda.is_available():
            return "hf"
    except Exception:  # noqa: BLE001
        return "hf"
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001
        return "hf"
    return "vllm"


def _load_template_owner(model_path: str, config: GenerationConfig, need_vision: bool, need_processor: bool = True):
    """(tokenizer, processor or None, is_vlm, model config) from the model folder.

    A VLM's processor is required when it computes the pixel inputs (hf); for vLLM, which processes
    images itself, a processor that cannot be loaded (e.g. no torchvision for its video processor) is
    replaced by the tokenizer's chat template, given the same image items."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    try:
        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise GenerationSetupError(f"cannot load the model config from {model_path}: {type(e).__name__}: {e}") from e
    is_vlm = is_vlm_config(model_config)
    if need_vision and not is_vlm:
        raise GenerationSetupError(
            f"the benchmarks have images but {model_path} is a text-only model (its config has no vision_config)"
        )
    processor = None
    if is_vlm:
        try:
            processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
        except Exception as e:  # noqa: BLE001
            if need_processor:
                raise GenerationSetupError(
                    f"{model_path} is a vision-language model but its processor cannot be loaded: "
                    f"{type(e).__name__}: {e}"
                ) from e
            print(
                f"warning: the processor of {model_path} cannot be loaded ({type(e).__name__}: {e}); rendering "
                "prompts with the tokenizer's chat template",
                file=sys.stderr,
            )
    if processor is not None:
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise GenerationSetupError(f"the processor of {model_path} has no tokenizer")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
        except Exception as e:  # noqa: BLE001
            raise GenerationSetupError(f"cannot load the tokenizer of {model_path}: {type(e).__name__}: {e}") from e
    return tokenizer, processor, is_vlm, model_config


class HFBackend:
    """`model.generate` in batches (left padding)."""

    name = "hf"

    def __init__(self, model_path: str, config: GenerationConfig, need_vision: bool = False):
        import torch
        import transformers

        self.config = config
        self.tokenizer, self.processor, self.is_vlm, _ = _load_template_owner(
            model_path, config, need_vision, need_processor=need_vision
        )
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if config.dtype == "auto":
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, config.dtype)
        auto_cls = transformers.AutoModelForImageTextToText if self.is_vlm else transformers.AutoModelForCausalLM
        try:
            model = auto_cls.from_pretrained(model_path, dtype=dtype, trust_remote_code=config.trust_remote_code)
        except Exception as e:  # noqa: BLE001
            raise GenerationSetupError(f"cannot load the model {model_path}: {type(e).__name__}: {e}") from e
        self.model = model.to(device).eval()
        self.device = device
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        transformers.set_seed(config.seed)

    def render(self, example: Example) -> str:
        owner = self.processor if self.processor is not None else self.tokenizer
        return render_prompt(owner, example, self.config, content_items=self.is_vlm)

    def generate(self, examples: list) -> list:
        import torch

        cfg = self.config
        texts = [self.render(ex) for ex in examples]
        images = [load_image(ref, ex) for ex in examples for ref in ex.images]
        if self.processor is not None:
            self.processor.tokenizer.padding_side = "left"
            kwargs = dict(text=texts, return_tensors="pt", padding=True, add_special_tokens=False)
            if images:
                kwargs["images"] = images
            inputs = self.processor(**kwargs)
        else:
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(self.device)
        sample = cfg.temperature > 0
        repeats = cfg.n_samples if sample else 1  # greedy: one generation, copied n times
        gen_kwargs = dict(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sample,
            num_return_sequences=repeats,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        # Exactly temperature + top-p, as vLLM samples with explicit SamplingParams: the model's own
        # generation_config defaults (Qwen-VL ships top_k / repetition_penalty) must not apply.
        gen_kwargs.update(repetition_penalty=1.0)
        if sample:
            gen_kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(**inputs, **gen_kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1] :].tolist()
        results = []
        for i in range(len(examples)):
            gens = []
            for ids in new_tokens[i * repeats : (i + 1) * repeats]:
                stop = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
                kept = ids if stop is None else ids[: stop + 1]
                text = self.tokenizer.decode(kept, skip_special_tokens=True)
                gens.append(Generation(text=text, num_tokens=len(kept), truncated=stop is None))
            results.append(gens if sample else gens * cfg.n_samples)
        return results

    def close(self) -> None:
        self.model = None


class VLLMBackend:
    """`vllm.LLM.generate` with `SamplingParams(temperature, top_p, n, max_tokens)`; images go in
    `multi_modal_data`. The chat template is rendered here (as for the hf backend)."""

    name = "vllm"

    def __init__(self, model_path: str, config: GenerationConfig, need_vision: bool = False, max_images: int = 0):
        try:
            from vllm import LLM, SamplingParams
        except Exception as e:  # noqa: BLE001
            raise GenerationSetupError(f"--backend vllm, but vllm cannot be imported: {type(e).__name__}: {e}") from e
        self.config = config
        self.tokenizer, self.processor, self.is_vlm, _ = _load_template_owner(
            model_path, config, need_vision, need_processor=False
        )
        kwargs = dict(
            model=model_path,
            seed=config.seed,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
        )
        if config.max_model_len:
            kwargs["max_model_len"] = config.max_model_len
        if self.is_vlm:
            kwargs["limit_mm_per_prompt"] = {"image": max(1, max_images)}
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # noqa: BLE001
            raise GenerationSetupError(f"vllm could not start {model_path}: {type(e).__name__}: {e}") from e
        self.sampling = SamplingParams(
            temperature=config.temperature, top_p=config.top_p, n=config.n_samples, max_tokens=config.max_new_tokens
        )

    def render(self, example: Example) -> str:
        owner = self.processor if self.processor is not None else self.tokenizer
        return render_prompt(owner, example, self.config, content_items=self.is_vlm)

    def generate(self, examples: list) -> list:
        requests = []
        for ex in examples:
            request = {"prompt": self.render(ex)}
            if ex.images:
                request["multi_modal_data"] = {"image": [load_image(ref, ex) for ref in ex.images]}
            requests.append(request)
        outputs = self.llm.generate(
            requests, self.sampling, use_tqdm=False, tokenization_kwargs={"add_special_tokens": False}
        )
        return [
            [Generation(c.text, len(c.token_ids), c.finish_reason == "length") for c in out.outputs] for out in outputs
        ]

    def close(self) -> None:
        self.llm = None


def create_backend(name: str, model_path: str, config: GenerationConfig, benchmarks: list):
    """The backend `name` (after `choose_backend`) for `model_path`, ready for `benchmarks`."""
    if not os.path.exists(model_path) and os.path.sep in model_path:
        raise GenerationSetupError(f"model path {model_path} does not exist")
    need_vision = any(b.multimodal for b in benchmarks)
    if name == "vllm":
        max_images = max((len(ex.images) for b in benchmarks for ex in b.examples), default=0)
        return VLLMBackend(model_path, config, need_vision, max_images)
    if name == "hf":
        return HFBackend(model_path, config, need_vision)
    raise GenerationSetupError(f"unknown backend {name!r}")
