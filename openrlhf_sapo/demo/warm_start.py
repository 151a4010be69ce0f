"""Supervised warm start for the CPU demo (the phase before PPO / GRPO / SAPO).

`warm_start(model_dir, task, out_dir, ...)` loads a (tiny) Qwen2 or Qwen2.5-VL checkpoint, trains it
with teacher forcing on chat-formatted prompts followed by the task's warm-start solutions (a mix of
reference solutions and single-mistake variants, `error_rate`), and saves the result to `out_dir`
so it reloads like the original (model, tokenizer, and for a VLM the processor and its code).

Sequence layout per example (right-padded in a batch):

    chat_template([user: prompt], add_generation_prompt=True)  |  solution text + <|im_end|>
    labels = -100                                               |  labels = token ids

i.e. the loss covers exactly the solution tokens and the closing `<|im_end|>` (so the model learns
to stop); prompt, chat markup, image tokens and padding are masked out. For the VLM the user
message is a content list `[image item, text item]` (the task prompt has no image placeholder),
and images go through the processor (`pixel_values`, `image_grid_thw`).

`evaluate(model_or_dir, task, n, seed)` generates greedily on `n` held-out examples with the vision
tokens suppressed and scores them with `task.reward` (format weight 0) and `task.format_ok`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from typing import Optional

import numpy as np
import torch

from openrlhf_sapo.demo.tiny_models import IM_END, vision_token_ids
from openrlhf_sapo.utils.vlm_utils import is_vlm_config

IGNORE_INDEX = -100
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "config.json",
                 "generation_config.json")


# --------------------------------------------------------------------------------------------------
# Loading


def load_model(model_dir: str):
    """(model, tokenizer, processor or None) from a folder built by `tiny_models` (or a warm start)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder {model_dir!r} does not exist")
    config = AutoConfig.from_pretrained(model_dir)
    if is_vlm_config(config):
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
        tokenizer = processor.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        processor = None
    if tokenizer.eos_token != IM_END:
        raise ValueError(f"expected eos {IM_END!r} in {model_dir!r}, got {tokenizer.eos_token!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer in {model_dir!r} has no pad token")
    return model, tokenizer, processor


# --------------------------------------------------------------------------------------------------
# Batches


def _messages(prompt: str, has_images: bool, n_images: int = 0) -> list:
    if not has_images:
        return [{"role": "user", "content": prompt}]
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def prompt_text(tokenizer, prompt: str, n_images: int = 0) -> str:
    """The chat-formatted prompt, ending with the assistant generation prompt."""
    return tokenizer.apply_chat_template(_messages(prompt, n_images > 0, n_images), tokenize=False,
                                         add_generation_prompt=True)


def _encode_prompt(tokenizer, processor, prompt: str, images: list) -> dict:
    """Token ids (1-D list) of the chat-formatted prompt, plus vision tensors for a VLM."""
    text = prompt_text(tokenizer, prompt, len(images))
    if images:
        if processor is None:
            raise ValueError("this example has images but the model has no processor (not a VLM?)")
        enc = processor(text=[text], images=list(images), return_tensors="pt")
        return {"ids": enc["input_ids"][0].tolist(), "pixel_values": enc["pixel_values"],
                "image_grid_thw": enc["image_grid_thw"]}
    return {"ids": tokenizer(text, add_special_tokens=False)["input_ids"]}


def build_batch(tokenizer, processor, prompts, solutions, images=None) -> dict:
    """Right-padded teacher-forcing batch: input_ids, attention_mask, labels (-100 except on the
    solution tokens and the closing eos), plus pixel_values / image_grid_thw when images are given."""
    if len(prompts) != len(solutions):
        raise ValueError(f"{len(prompts)} prompts but {len(solutions)} solutions")
    if not prompts:
        raise ValueError("empty batch")
    images = images if images is not None else [[] for _ in prompts]
    seqs, labels, pixel_values, grids = [], [], [], []
    for prompt, solution, imgs in zip(prompts, solutions, images):
        enc = _encode_prompt(tokenizer, processor, prompt, imgs)
        sol = tokenizer(solution + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        seqs.append(enc["ids"] + sol)
        labels.append([IGNORE_INDEX] * len(enc["ids"]) + list(sol))
        if "pixel_values" in enc:
            pixel_values.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long),
        "labels": torch.tensor([l + [IGNORE_INDEX] * (width - len(l)) for l in labels], dtype=torch.long),
    }
    if pixel_values:
        if len(pixel_values) != len(prompts):
            raise ValueError("mixing examples with and without images in one batch is not supported")
        batch["pixel_values"] = torch.cat(pixel_values, 0)
        batch["image_grid_thw"] = torch.cat(grids, 0)
    return batch


def _loss(model, batch) -> torch.Tensor:
    """Mean token cross-entropy over the labelled (solution) tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model_dir_or_model, task, n: int = 32, seed: int = 0, tokenizer=None, processor=None,
             max_new_tokens: int = 64, batch_size: int = 16, split: str = "heldout") -> dict:
    """Greedy accuracy on `n` examples of `split`. Pass a folder, or a model with its tokenizer
    (and processor for a VLM). Returns accuracy (mean `task.reward` with format weight 0),
    format_rate (`task.format_ok`), boxed_rate (contains `\\boxed{`), and the responses."""
    if isinstance(model_dir_or_model, (str, os.PathLike)):
        model, tokenizer, processor = load_model(str(model_dir_or_model))
    else:
        model = model_dir_or_model
        if tokenizer is None:
            raise ValueError("pass the tokenizer along with a model object")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    examples = task.sample(n, split, seed)
    suppress = vision_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    responses = []
    try:
        for start in range(0, n, batch_size):
            chunk = examples[start:start + batch_size]
            encs = [_encode_prompt(tokenizer, processor, ex.prompt, ex.images) for ex in chunk]
            width = max(len(e["ids"]) for e in encs)
            pad = tokenizer.pad_token_id
            inputs = {  # left padding for generation
                "input_ids": torch.tensor([[pad] * (width - len(e["ids"])) + e["ids"] for e in encs]),
                "attention_mask": torch.tensor([[0] * (width - len(e["ids"])) + [1] * len(e["ids"]) for e in encs]),
            }
            if any("pixel_values" in e for e in encs):
                inputs["pixel_values"] = torch.cat([e["pixel_values"] for e in encs], 0)
                inputs["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in encs], 0)
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, suppress_tokens=suppress,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
            responses += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    rewards = [task.reward(r, ex.label, format_weight=0.0) for r, ex in zip(responses, examples)]
    return {
        "accuracy": float(np.mean(rewards)),
        "format_rate": float(np.mean([task.format_ok(r) for r in responses])),
        "boxed_rate": float(np.mean(["\\boxed{" in r for r in responses])),
        "responses": responses,
    }


# --------------------------------------------------------------------------------------------------
# Training


def _save(model, tokenizer, processor, model_dir: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    (processor or tokenizer).save_pretrained(out_dir)
    # Anything else the source folder carries (the VLM processor's remote code, ...).
    for name in os.listdir(model_dir):
        src = os.path.join(model_dir, name)
        if os.path.isfile(src) and name not in _WEIGHT_FILES and not os.path.exists(os.path.join(out_dir, name)):
            shutil.copy2(src, os.path.join(out_dir, name))


def warm_start(model_dir: str, task, out_dir: str, steps: int = 200, batch_size: int = 16, lr: float = 3e-3,
               error_rate: float = 0.3, seed: int = 0, device: str = "cpu", progress: bool = True,
               eval_n: int = 32, eval_seed: int = 0, weight_decay: float = 0.0,
               max_grad_norm: Optional[float] = 1.0) -> dict:
    """Teacher-forced SFT of `model_dir` on `task`'s warm-start solutions; saves to `out_dir`.

    Each step draws `batch_size` fresh train examples (deterministic in `seed`), one warm-start
    solution each (a single-mistake variant with probability `error_rate`). AdamW with constant
    `lr`. Returns metrics: losses (per step), initial_loss, final_loss (mean of the last
    max(1, steps // 10) steps), seconds (training), and the held-out greedy `evaluate` results
    (eval_accuracy, eval_format_rate, eval_boxed_rate; skipped when eval_n = 0).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if os.path.abspath(out_dir) == os.path.abspath(model_dir):
        raise ValueError("out_dir must differ from model_dir (the source checkpoint is kept)")
    from tqdm.auto import tqdm

    model, tokenizer, processor = load_model(model_dir)
    model.to(device)
    model.train()
    examples = task.sample(steps * batch_size, "train", seed)
    rng = np.random.default_rng([int(seed), 1])
    solutions = [task.warm_start_solutions(ex, rng, error_rate, n=1)[0].text for ex in examples]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        t0 = time.perf_counter()
        bar = tqdm(range(steps), desc=f"warm start ({task.name})", disable=not progress)
        for step in bar:
            chunk = slice(step * batch_size, (step + 1) * batch_size)
            exs = examples[chunk]
            batch = build_batch(tokenizer, processor, [e.prompt for e in exs], solutions[chunk],
                                [e.images for e in exs])
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = _loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; lower lr ({lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            losses.append(float(loss.item()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - t0
    model.eval()
    _save(model, tokenizer, processor, model_dir, out_dir)
    tail = max(1, steps // 10)
    metrics = {"losses": losses, "initial_loss": losses[0], "final_loss": float(np.mean(losses[-tail:])),
               "seconds": seconds, "steps": steps, "batch_size": batch_size, "out_dir": out_dir}
    if eval_n:
        ev = evaluate(model, task, eval_n, eval_seed, tokenizer=tokenizer, processor=processor)
        metrics.update(eval_accuracy=ev["accuracy"], eval_format_rate=ev["format_rate"],
                       eval_boxed_rate=ev["boxed_rate"], eval_responses=ev["responses"])
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError("non-finite loss")
    return metrics
