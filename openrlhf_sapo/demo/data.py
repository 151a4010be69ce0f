"""Demo task data as OpenRLHF prompt files (`--data.prompt_dataset`, `--eval.dataset`).

One JSON object per line, the same layout as the Geo3K / GSM8K preparation modules write:
`{"prompt": "<image>Read digits a,b. Compute a+b.", "label": "9", "images": ["/abs/.../0.png"],
"datasource": "digits"}` (text tasks have no `images`). The `<image>` tags become image items of the
user message under `--data.apply_chat_template`, as in the warm start's chat format.
"""

from __future__ import annotations

import json
import os

from openrlhf_sapo.demo.tasks import Task


def write_split(task: Task, out_dir: str, split: str, n: int, seed: int = 0) -> str:
    """Write `n` examples of `split` to `<out_dir>/<split>.jsonl` (images as PNG next to it)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path, "w") as f:
        for i, ex in enumerate(task.sample(n, split, seed)):
            row = {"prompt": "<image>" * len(ex.images) + ex.prompt, "label": ex.label, "datasource": task.name}
            if ex.images:
                image_dir = os.path.join(os.path.abspath(out_dir), "images", split)
                os.makedirs(image_dir, exist_ok=True)
                row["images"] = []
                for j, image in enumerate(ex.images):
                    image_path = os.path.join(image_dir, f"{i}_{j}.png")
                    image.save(image_path)
                    row["images"].append(image_path)
            f.write(json.dumps(row) + "\n")
    return path
