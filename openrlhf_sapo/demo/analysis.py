"""Are SAPO's segments meaningful on the demo task, and is its credit assignment step-wise?

`analyze(model_dir, task, n, seed)` samples `n` held-out responses from a checkpoint as the RL
rollouts do (temperature 1, vision tokens suppressed), recomputes each response token's entropy
with the same model, cuts entropy segments (top `topk_percent` %, SAPO's default segmenter), and
labels every response token by its role in the step-wise solution:

    reading digit | reading comma | operand | operator | equals | result digit | newline |
    boxed markup | answer digit | end (the closing <|im_end|>) | other

It returns, per role, the share of tokens, the share of segment ends, their ratio (the lift: > 1
means the segmenter cuts there more often than at random) and the mean entropy; and, for the wrong
answers, where the first error is (a misread digit, a wrong arithmetic step, a step inconsistent
with the previous ones, or the format). A step-wise credit assignment helps when errors sit in
identifiable steps and the segment ends fall at the tokens that decide them.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from typing import Dict, List

import torch

ROLES = ("reading digit", "reading comma", "operand", "operator", "equals", "result digit", "newline",
         "boxed markup", "answer digit", "end", "other")
_STEP = re.compile(r"^(-?\d+)([+\-*])(-?\d+)=(-?\d+)$")


def _line_roles(line: str, index: int) -> List[str]:
    if line.startswith("\\boxed{"):
        inner = len(line) - len("\\boxed{") - (1 if line.endswith("}") else 0)
        return ["boxed markup"] * len("\\boxed{") + ["answer digit"] * inner + ["boxed markup"] * (len(line) - len("\\boxed{") - inner)
    if index == 0:
        return ["reading digit" if c.isdigit() else "reading comma" if c == "," else "other" for c in line]
    roles, after_equals = [], False
    for c in line:
        if c == "=":
            roles.append("equals")
            after_equals = True
        elif c.isdigit():
            roles.append("result digit" if after_equals else "operand")
        else:
            roles.append("operator" if c in "+-*" else "other")
    return roles


def token_roles(text_per_token: List[str], step_sep: str = "\n") -> List[str]:
    """The role of each response token, from the line it is in (line 0 reads the digits, then one
    operation per line, then the boxed answer). Special tokens are "end"; a multi-character token
    takes the role of its first character."""
    text = "".join(t for t in text_per_token if not (t.startswith("<|") and t.endswith("|>")))
    char_roles: List[str] = []
    for i, line in enumerate(text.split(step_sep)):
        if i:
            char_roles += ["newline"] * len(step_sep)
        char_roles += _line_roles(line, i)
    roles, pos = [], 0
    for piece in text_per_token:
        if piece.startswith("<|") and piece.endswith("|>"):
            roles.append("end")
            continue
        roles.append(char_roles[pos] if pos < len(char_roles) else "other")
        pos += max(len(piece), 1)
    return roles


def first_error(response: str, example) -> str:
    """Where a wrong response first goes wrong: misread, arithmetic, inconsistent, format, or none."""
    from openrlhf_sapo.demo.tasks import last_boxed

    lines = response.strip().split("\n")
    numbers = [str(n) for n in example.meta["numbers"]]
    if lines and "," in lines[0] or (lines and lines[0].isdigit() and len(numbers) == 1):
        if lines[0].split(",") != numbers:
            return "misread"
        lines = lines[1:]
    else:
        return "format"
    for line in lines[:-1]:
        m = _STEP.match(line)
        if not m:
            return "format"
        x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
        if {"+": x + y, "-": x - y, "*": x * y}[op] != z:
            return "arithmetic"
    if last_boxed(response) != example.label:
        return "inconsistent" if last_boxed(response) is not None else "format"
    return "none"


@torch.no_grad()
def analyze(model_dir: str, task, n: int = 128, seed: int = 0, topk_percent: float = 30.0,
            max_new_tokens: int = 40, batch_size: int = 32, code_dir: str = None) -> Dict:
    from openrlhf_sapo.algo import entropy_segment_ends
    from openrlhf_sapo.demo.tiny_models import vision_token_ids
    from openrlhf_sapo.demo.warm_start import _encode_prompt, load_model

    if code_dir:
        # A checkpoint saved by training keeps weights, config and tokenizer, not the tiny VLM's
        # processor (its config and remote code): take those from the folder the run started from.
        from openrlhf_sapo.demo.warm_start import _WEIGHT_FILES

        for name in os.listdir(code_dir):
            src, dst = os.path.join(code_dir, name), os.path.join(model_dir, name)
            if os.path.isfile(src) and name not in _WEIGHT_FILES and not os.path.exists(dst):
                shutil.copy2(src, dst)
    model, tokenizer, processor = load_model(model_dir)
    model.eval()
    examples = task.sample(n, "heldout", seed)
    torch.manual_seed(seed)
    tokens, ends, entropies, errors = Counter(), Counter(), {r: [] for r in ROLES}, Counter()
    correct = 0
    pad = tokenizer.pad_token_id
    for start in range(0, n, batch_size):
        chunk = examples[start : start + batch_size]
        encs = [_encode_prompt(tokenizer, processor, ex.prompt, ex.images) for ex in chunk]
        width = max(len(e["ids"]) for e in encs)
        inputs = {
            "input_ids": torch.tensor([[pad] * (width - len(e["ids"])) + e["ids"] for e in encs]),
            "attention_mask": torch.tensor([[0] * (width - len(e["ids"])) + [1] * len(e["ids"]) for e in encs]),
        }
        if "pixel_values" in encs[0]:
            inputs["pixel_values"] = torch.cat([e["pixel_values"] for e in encs])
            inputs["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in encs])
        out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             suppress_tokens=vision_token_ids(tokenizer), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad)
        response = out[:, width:]
        mask = torch.zeros_like(response, dtype=torch.bool)
        for i, row in enumerate(response.tolist()):
            length = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            mask[i, :length] = True
        full_mask = torch.cat([inputs["attention_mask"], mask.long()], 1)
        logits = model(**dict(inputs, input_ids=out, attention_mask=full_mask)).logits[:, width - 1 : -1].float()
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        cut = entropy_segment_ends(entropy, mask, topk_percent)
        for i, ex in enumerate(chunk):
            ids = response[i][mask[i]].tolist()
            pieces = [tokenizer.decode([t]) for t in ids]
            token_role = token_roles(pieces, task.step_sep)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            ok = task.reward(text, ex.label, format_weight=0.0) == 1.0
            correct += ok
            if not ok:
                errors[first_error(text, ex)] += 1
            for j, role in enumerate(token_role):
                tokens[role] += 1
                ends[role] += int(cut[i, j])
                entropies[role].append(float(entropy[i, j]))
    total_tokens, total_ends = sum(tokens.values()), max(sum(ends.values()), 1)
    by_role = {}
    for role in ROLES:
        if not tokens[role]:
            continue
        token_share, end_share = tokens[role] / total_tokens, ends[role] / total_ends
        by_role[role] = {"token_share": token_share, "end_share": end_share, "lift": end_share / token_share,
                         "mean_entropy": sum(entropies[role]) / len(entropies[role])}
    wrong = n - correct
    return {"model_dir": model_dir, "n": n, "accuracy": correct / n, "topk_percent": topk_percent,
            "roles": by_role, "errors": {k: v / max(wrong, 1) for k, v in errors.most_common()}, "wrong": wrong}


def markdown(result: Dict, title: str) -> List[str]:
    lines = [f"**{title}** ({result['n']} held-out problems sampled at temperature 1, accuracy "
             f"{100 * result['accuracy']:.0f}%, segment ends = top {result['topk_percent']:g}% entropy):", "",
             "| token role | share of tokens | share of segment ends | lift | mean entropy (nats) |",
             "|---|---|---|---|---|"]
    ranked = sorted(result["roles"].items(), key=lambda kv: -kv[1]["lift"])
    for role, r in ranked:
        lines.append(f"| {role} | {100 * r['token_share']:.1f}% | {100 * r['end_share']:.1f}% | {r['lift']:.2f} | "
                     f"{r['mean_entropy']:.3f} |")
    if result["wrong"]:
        parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["errors"].items())
        lines += ["", f"First error of the {result['wrong']} wrong answers: {parts}."]
    return lines
