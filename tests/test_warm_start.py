"""Supervised warm start (openrlhf_sapo.demo.warm_start) on the arithmetic task with a tiny Qwen2."""

import os

import pytest
import torch

from openrlhf_sapo.demo.tasks import get_task
from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2
from openrlhf_sapo.demo.warm_start import IGNORE_INDEX, build_batch, evaluate, load_model, prompt_text, warm_start

STEPS, BATCH, LR = 40, 16, 3e-3


@pytest.fixture(scope="module")
def task():
    return get_task("arithmetic")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_tiny_qwen2(str(tmp_path_factory.mktemp("ws_base")), hidden=64, layers=2, heads=4, seed=0)


@pytest.fixture(scope="module")
def trained(base_dir, task, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ws_out"))
    metrics = warm_start(base_dir, task, out, steps=STEPS, batch_size=BATCH, lr=LR, seed=0, progress=False,
                         eval_n=16)
    return out, metrics


def test_loss_mask_covers_exactly_the_solution_tokens(base_dir):
    _, tok, proc = load_model(base_dir)
    prompts, sols = ["3+4=?", "1*2-1=?"], ["3+4=7\n\\boxed{7}", "1*2=2\n2-1=1\n\\boxed{1}"]
    batch = build_batch(tok, proc, prompts, sols)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape
    for i, (p, s) in enumerate(zip(prompts, sols)):
        head = tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"]
        assert tok.decode(head).endswith("<|im_start|>assistant\n")
        target = tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(head) + len(target)
        assert ids[i, :n].tolist() == head + target
        assert mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        # exactly the solution (+ closing eos) is labelled, with its own ids
        assert labels[i, : len(head)].eq(IGNORE_INDEX).all()
        assert labels[i, len(head) : n].tolist() == target
        assert labels[i, n:].eq(IGNORE_INDEX).all()
        assert tok.decode(labels[i][labels[i] != IGNORE_INDEX]) == s + "<|im_end|>"
    with pytest.raises(ValueError, match="prompts but"):
        build_batch(tok, proc, prompts, sols[:1])


def test_loss_decreases_substantially(trained):
    _, m = trained
    assert len(m["losses"]) == STEPS and all(torch.isfinite(torch.tensor(m["losses"])))
    assert m["final_loss"] < 0.5 * m["initial_loss"], (m["initial_loss"], m["final_loss"])
    assert m["seconds"] > 0


def test_saved_folder_reloads_and_generates(trained, base_dir):
    out, _ = trained
    assert set(os.listdir(base_dir)) <= set(os.listdir(out))
    model, tok, proc = load_model(out)
    assert proc is None
    base_tok = load_model(base_dir)[1]
    assert tok("7+8=?<|im_end|>")["input_ids"] == base_tok("7+8=?<|im_end|>")["input_ids"]
    enc = tok(prompt_text(tok, "2+3=?"), return_tensors="pt", add_special_tokens=False)
    gen = model.generate(**enc, do_sample=False, max_new_tokens=8)
    assert gen.shape[1] > enc["input_ids"].shape[1]
    # the weights changed from the base checkpoint
    base = load_model(base_dir)[0]
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_trained_model_follows_the_step_format_more_than_the_untrained(trained, base_dir, task):
    out, m = trained
    before = evaluate(base_dir, task, n=16, seed=0)
    after = evaluate(out, task, n=16, seed=0)
    for ev in (before, after):
        assert 0.0 <= ev["accuracy"] <= 1.0 and len(ev["responses"]) == 16
    assert after["boxed_rate"] > before["boxed_rate"]
    assert after["boxed_rate"] >= 0.5, after["responses"][:4]
    # evaluate on the reloaded folder agrees with the metrics computed on the in-memory model
    assert after["accuracy"] == m["eval_accuracy"] and after["boxed_rate"] == m["eval_boxed_rate"]


def test_same_seed_is_deterministic_and_another_seed_differs(base_dir, task, tmp_path):
    kw = dict(steps=3, batch_size=4, lr=LR, progress=False, eval_n=0)
    a = warm_start(base_dir, task, str(tmp_path / "a"), seed=1, **kw)
    b = warm_start(base_dir, task, str(tmp_path / "b"), seed=1, **kw)
    c = warm_start(base_dir, task, str(tmp_path / "c"), seed=2, **kw)
    assert a["losses"] == b["losses"]
    assert a["losses"] != c["losses"]
    wa, wb = load_model(str(tmp_path / "a"))[0], load_model(str(tmp_path / "b"))[0]
    assert all(torch.equal(x, y) for x, y in zip(wa.state_dict().values(), wb.state_dict().values()))


def test_bad_arguments_raise_clear_errors(base_dir, task, tmp_path):
    with pytest.raises(ValueError, match="steps and batch_size"):
        warm_start(base_dir, task, str(tmp_path / "x"), steps=0, batch_size=4, lr=LR, progress=False)
    with pytest.raises(ValueError, match="out_dir must differ"):
        warm_start(base_dir, task, base_dir, steps=1, batch_size=4, lr=LR, progress=False)
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing"))


def test_digits_vlm_batch_and_short_warm_start(tmp_path):
    from openrlhf_sapo.demo.tiny_models import IMAGE_PAD, build_tiny_qwen2_5_vl

    task = get_task("digits")
    base = build_tiny_qwen2_5_vl(str(tmp_path / "vlm"), seed=0)
    _, tok, proc = load_model(base)
    assert proc is not None
    exs = task.sample(2, "train", seed=0)
    batch = build_batch(tok, proc, [e.prompt for e in exs], [e.solution for e in exs], [e.images for e in exs])
    pad_id = tok.convert_tokens_to_ids(IMAGE_PAD)
    grid = batch["image_grid_thw"]
    assert grid.shape == (2, 3) and batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    for i, e in enumerate(exs):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        # one <|image_pad|> per 28x28 tile (2x2 merge), before the prompt text; none of them labelled
        assert int((ids == pad_id).sum()) == int(grid[i].prod()) // 4 == len(e.meta["numbers"])
        assert labels[ids == pad_id].eq(IGNORE_INDEX).all()
        assert tok.decode(labels[labels != IGNORE_INDEX]) == e.solution + "<|im_end|>"
        text = tok.decode(ids[ids != tok.pad_token_id])
        assert text.index(IMAGE_PAD) < text.index(e.prompt)
    m = warm_start(base, task, str(tmp_path / "ws"), steps=12, batch_size=8, lr=LR, progress=False, eval_n=4)
    assert m["final_loss"] < 0.6 * m["initial_loss"], (m["initial_loss"], m["final_loss"])
    assert 0.0 <= m["eval_accuracy"] <= 1.0
    model, tok2, proc2 = load_model(str(tmp_path / "ws"))
    assert type(proc2).__name__ == type(proc).__name__
    ev = evaluate(model, task, n=2, seed=0, tokenizer=tok2, processor=proc2, max_new_tokens=8)
    assert len(ev["responses"]) == 2
