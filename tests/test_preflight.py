"""Bad input fails in seconds, before anything heavy, naming the row or flag and the fix (both CLIs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from openrlhf_sapo.cli import preflight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIS = ("train_ppo_ray", "train_local")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(str(tmp_path_factory.mktemp("vlm")))


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (28, 28)).save(path)
        paths.append(str(path))
    return paths


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def run_cli(cli, *argv, cwd=None, timeout=120):
    start = time.time()
    out = subprocess.run([sys.executable, "-m", f"openrlhf_sapo.cli.{cli}", *argv], capture_output=True, text=True,
                         timeout=timeout, cwd=cwd or REPO)
    return out, time.time() - start


def base_flags(model, data, tmp_path, *extra):
    return ["--actor.model_name_or_path", model, "--reward.remote_url", os.path.join(REPO, "openrlhf_sapo", "demo",
            "reward_func.py"), "--data.prompt_dataset", data, "--data.input_key", "prompt", "--data.label_key", "label",
            "--rollout.batch_size", "2", "--train.batch_size", "2", "--rollout.max_new_tokens", "8",
            "--data.max_len", "64", "--ckpt.path", str(tmp_path / "ckpt"), "--vllm.num_engines", "1",
            *[f for role in ("actor", "critic", "ref") for f in (f"--{role}.num_gpus_per_node", "1")], *extra]


@pytest.mark.parametrize("cli", CLIS)
def test_bad_rows_are_reported_by_row_before_anything_starts(cli, vlm, images, tmp_path):
    good = {"prompt": "<image>Read the digits.", "label": "3", "images": [images[0]]}
    data = write_jsonl(tmp_path / "train.jsonl", [
        good,
        {"prompt": "<image>Read the digits.", "label": "4"},  # row 2: a VLM row without images
        good,
        '{"prompt": "<image>x", "label": "5", "images": [',  # row 4: malformed
        {"prompt": "<image>Read.", "images": [images[1]]},  # row 5: no label
        {"prompt": "<image><image>Read.", "label": "6", "images": [images[2]]},  # row 6: two tags, one image
        {"prompt": "<image>Read.", "label": "7", "images": [str(tmp_path / "missing.png")]},  # row 7
        {"question": "no prompt key", "label": "8"},  # row 8
    ])
    out, seconds = run_cli(cli, *base_flags(vlm, data, tmp_path), "--dry-run")
    assert out.returncode == 2, out.stdout[-2000:]
    err = out.stderr
    assert "usage:" not in err and "--help` lists every flag" in err
    assert "6 problems found before starting" in err
    for fragment in ("row 2: the prompt has 1 <image> tag(s) but 0 image(s) under 'images'",
                     "row 4: not valid JSON", "row 5: no label under 'label' (--data.label_key)",
                     "row 6: the prompt has 2 <image> tag(s) but 1 image(s)", "row 7: an image file does not exist",
                     "row 8: no prompt under 'prompt' (--data.input_key; the row has: label, question)"):
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err and seconds < 30, seconds


@pytest.mark.parametrize("cli", CLIS)
def test_missing_paths_are_missing_paths_not_hub_names(cli, tmp_path):
    out, seconds = run_cli(cli, *base_flags("./no-such-model", "./no/such/folder", tmp_path,
                                            "--eval.dataset", str(tmp_path / "eval.jsonl")), "--dry-run")
    assert out.returncode == 2
    assert "--data.prompt_dataset ./no/such/folder: no such file or folder (a local path, so it is not looked up" in out.stderr
    assert f"--eval.dataset {tmp_path / 'eval.jsonl'}: no such file or folder" in out.stderr
    assert seconds < 30


def test_a_hub_name_is_left_to_the_hub_unless_offline(monkeypatch, tmp_path):
    from types import SimpleNamespace

    args = SimpleNamespace(
        data=SimpleNamespace(max_images_per_prompt=0, input_key="prompt", label_key=None, image_key="images",
                             prompt_dataset="owner/name", max_samples=10),
        eval=SimpleNamespace(dataset=None), actor=SimpleNamespace(model_name_or_path="owner/model"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    problems = preflight.Problems()
    preflight.check_datasets(args, problems)
    assert not problems
    (tmp_path / "data").mkdir()  # `data/name` under a folder that exists here is a local path, and missing
    monkeypatch.chdir(tmp_path)
    args.data.prompt_dataset = "data/name"
    preflight.check_datasets(args, problems)
    assert problems.lines() == ["--data.prompt_dataset data/name: no such file or folder (a local path, so it is not "
                                "looked up on the Hugging Face hub): check the path, relative to the directory the run "
                                "starts in"]
    problems = preflight.Problems()
    args.data.prompt_dataset = "owner/name"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preflight.check_datasets(args, problems)
    assert "not a local path, and the hub is offline" in problems.lines()[0]


@pytest.mark.parametrize("argv,message", [
    (["--rollout.max_new_tokens", "0"], "--rollout.max_new_tokens must be >= 1 token, got 0"),
    (["--rollout.max_new_tokens", "-5"], "--rollout.max_new_tokens must be >= 1 token, got -5"),
    (["--data.max_len", "8"], "--data.max_len (8) is prompt + response, so it must exceed --rollout.max_new_tokens (8)"),
    (["--ds.packing_samples", "--data.image_key", "images"], "is a VLM) cannot use sample packing"),
])
def test_flag_errors_are_one_line_without_usage(argv, message, vlm, images, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "<image>x", "label": "1", "images": [images[0]]}] * 4)
    for cli in CLIS:
        out, _ = run_cli(cli, *base_flags(vlm, data, tmp_path, *argv), "--dry-run")
        assert out.returncode == 2 and message in out.stderr, (cli, out.stderr[-1500:])
        assert "usage:" not in out.stderr and len(out.stderr.strip().splitlines()) == 2, out.stderr


def test_too_little_data_for_one_step(tmp_path, vlm, images):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "<image>x", "label": "1", "images": [images[0]]}])
    out, _ = run_cli("train_ppo_ray", *base_flags(vlm, data, tmp_path, "--train.batch_size", "4",
                                                 "--rollout.batch_size", "4"), "--dry-run")
    assert out.returncode == 2
    assert "--train.batch_size: 4 samples per step, but the training data gives 1 prompts x 1 samples = 1" in out.stderr


def test_a_run_directory_is_resumed_only_when_asked(tmp_path, vlm, images):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "<image>x", "label": "1", "images": [images[0]]}] * 4)
    flags = base_flags(vlm, data, tmp_path)
    out, _ = run_cli("train_local", *flags, "--resume", "--dry-run")
    assert out.returncode == 2
    assert f"--resume: no checkpoint under {tmp_path / 'ckpt' / '_actor'}" in out.stderr
    (tmp_path / "ckpt" / "_actor" / "global_step2").mkdir(parents=True)
    for cli, resume in (("train_local", "--resume"), ("train_ppo_ray", "--ckpt.load_enable")):
        out, _ = run_cli(cli, *flags, "--dry-run")
        assert out.returncode == 2
        assert f"holds a run already (checkpoint {tmp_path / 'ckpt' / '_actor'}): pass {resume} to continue it" in out.stderr
        out, _ = run_cli(cli, *flags, resume, "--dry-run")
        assert out.returncode == 0, out.stderr[-1500:]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "step": 1}\n')
    out, _ = run_cli("train_local", *base_flags(vlm, data, tmp_path, "--ckpt.path", str(tmp_path / "other")),
                     "--local.metrics_jsonl", str(metrics), "--dry-run")
    assert out.returncode == 2 and "already holds a run's metrics: pass --resume" in out.stderr


def test_reading_100k_rows_takes_about_a_second(tmp_path):
    """The cost on a large dataset (streamed; images checked with one stat each)."""
    from types import SimpleNamespace

    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    row = json.dumps({"prompt": "<image>Read the digits and add them.", "label": "12", "images": [str(image)]})
    path = tmp_path / "big.jsonl"
    path.write_text((row + "\n") * 100_000)
    args = SimpleNamespace(
        data=SimpleNamespace(max_images_per_prompt=1, input_key="prompt", label_key="label", image_key="images",
                             prompt_dataset=str(path), max_samples=int(1e8)),
        eval=SimpleNamespace(dataset=None), actor=SimpleNamespace(model_name_or_path=None))
    start = time.time()
    problems = preflight.Problems()
    used = preflight.check_datasets(args, problems)
    seconds = time.time() - start
    assert not problems and used["--data.prompt_dataset"] == 100_000
    print(f"100k rows: {seconds:.2f} s")
    assert seconds < 10, seconds


def test_only_the_rows_a_run_uses_are_read(tmp_path):
    from types import SimpleNamespace

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "label": "1"}] * 3 + ["{broken"])
    args = SimpleNamespace(
        data=SimpleNamespace(max_images_per_prompt=0, input_key="prompt", label_key="label", image_key="images",
                             prompt_dataset=path, max_samples=3),
        eval=SimpleNamespace(dataset=None), actor=SimpleNamespace(model_name_or_path=None))
    problems = preflight.Problems()
    assert preflight.check_datasets(args, problems)["--data.prompt_dataset"] == 3 and not problems
    args.data.max_samples = 4
    preflight.check_datasets(args, problems)
    assert problems.lines() == [f"{path}: row 4: not valid JSON (Expecting property name enclosed in double quotes at "
                                "column 2): fix or remove the line"]
