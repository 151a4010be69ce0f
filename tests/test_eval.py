"""`python -m openrlhf_sapo.eval`: benchmark loading, scoring, metrics, tables, and an end-to-end run.

The end-to-end run uses a tiny local Qwen2 (character-level tokenizer with a ChatML template, built
here, no download) whose weights make it a bigram machine: after the last token of the assistant
turn's opening ("\\n") it writes ``\\boxed{2}`` and stops. So real generation, decoding and grading give
known accuracies, and a prompt rendered without the chat template would not reach the chain.
The "oracle" tests replace the backend with canned responses to check every metric exactly.
"""

import json
import os
import string
import subprocess
import sys

import pytest

from openrlhf_sapo.eval import benchmarks as bm
from openrlhf_sapo.eval import generate as gen
from openrlhf_sapo.eval import main
from openrlhf_sapo.eval import report
from openrlhf_sapo.rewards import grading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAIN = ["\n", "\\", "b", "o", "x", "e", "d", "{", "2", "}", "<|im_end|>"]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _png(path, color=(255, 0, 0)):
    from PIL import Image

    Image.new("RGB", (8, 8), color).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    # Byte-level symbols (as Qwen2's own tokenizer, which AutoTokenizer picks for a qwen2 model, expects:
    # "\n" is "Ċ"), one per printable character; no merges, so one token per character.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    symbol = {c: byte_level.pre_tokenize_str(c)[0][0] for c in dict.fromkeys(string.printable)}
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(symbol.values()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    tokenizer.save_pretrained(path)

    eos = vocab["<|im_end|>"]
    config = Qwen2Config(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=eos, pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        # Layers add nothing to the residual stream; each chain token has its own embedding direction,
        # every other token embeds to 0 (uniform next-token distribution); lm_head maps direction i to
        # the chain's next token with a large logit.
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (cur, nxt) in enumerate(zip(CHAIN, CHAIN[1:])):
            model.model.embed_tokens.weight[vocab[symbol.get(cur, cur)], i] = 1.0
            model.lm_head.weight[vocab[symbol.get(nxt, nxt)], i] = 50.0
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=vocab["<|endoftext|>"])
    model.save_pretrained(path)
    return path


@pytest.fixture
def text_benches(tmp_path):
    """Two small text benchmarks: `arith.jsonl` named Geo3K on the command line, and `gsm8k.jsonl`
    named by its rows' datasource."""
    arith = _write_jsonl(tmp_path / "arith.jsonl", [
        {"id": "a1", "prompt": "What is 1+1? Put it in \\boxed{}.", "label": "2", "answer_type": "number"},
        {"id": "a2", "prompt": "What is 2+3?", "label": 5, "answer_type": "number"},
        {"id": "a3", "prompt": "Pick one.", "label": "(B)", "answer_type": "choice", "choices": ["1", "2"]},
    ])
    gsm = _write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"prompt": "Q one", "label": "2.0", "datasource": "gsm8k"},
        {"prompt": "Q two", "label": "x+1", "answer_type": "expression", "datasource": "gsm8k"},
    ])
    return arith, gsm


# --------------------------------------------------------------------------------------------
# End to end with the tiny model and the hf backend


def test_end_to_end_hf_tiny_model(tiny_model, text_benches, tmp_path):
    arith, gsm = text_benches
    out = tmp_path / "out"
    rc = main([
        "--model", tiny_model, "--benchmarks", f"geo3k={arith}", gsm, "--output-dir", str(out),
        "--backend", "hf", "--n-samples", "2", "--max-new-tokens", "12", "--batch-size", "2",
        "--seed", "1", "--label", "tiny", "--no-progress",
    ])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["results.json", "samples.jsonl", "table.md"]
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]

    assert results["model"] == os.path.abspath(tiny_model) and results["backend"] == "hf"
    assert results["config"]["temperature"] == 0.6 and results["config"]["top_p"] == 0.95
    assert results["config"]["n_samples"] == 2 and results["config"]["format_weight"] == 0.0
    assert list(results["benchmarks"]) == ["Geo3K", "GSM8K"]
    assert len(samples) == (3 + 2) * 2
    assert {(s["benchmark"], s["id"]) for s in samples} == {
        ("Geo3K", "a1"), ("Geo3K", "a2"), ("Geo3K", "a3"), ("GSM8K", "gsm8k/1"), ("GSM8K", "gsm8k/2")
    }

    # The bigram model answers "\boxed{2}" every time (so the chat template was applied and decoding
    # dropped the end-of-turn token): right for labels 2, 2.0 and (choice text "2" of option) B.
    assert {s["response"] for s in samples} == {"\\boxed{2}"}
    assert all(s["num_tokens"] == 10 and s["truncated"] is False for s in samples)
    geo, g8k = results["benchmarks"]["Geo3K"], results["benchmarks"]["GSM8K"]
    assert geo["accuracy"] == pytest.approx(2 / 3) and g8k["accuracy"] == pytest.approx(1 / 2)
    assert geo["pass@2"] == pytest.approx(2 / 3) and geo["mean@2"] == geo["accuracy"]
    assert geo["count"] == 3 and geo["n_samples"] == 2 and geo["extraction_failure_rate"] == 0.0
    assert geo["file"] == os.path.abspath(arith)

    # The reported accuracy is what grading the saved samples gives.
    for name, m in results["benchmarks"].items():
        mine = [s for s in samples if s["benchmark"] == name]
        regraded = [
            grading.score_response(s["response"], s["label"], s["answer_type"], format_weight=0.0) for s in mine
        ]
        direct = [r["accuracy"] for r in regraded]
        # a3 is right only through its option text (the grader itself compares letters)
        via_choice = [
            s["correct"] and r["accuracy"] == 0 and s["reason"].startswith("ok (matched")
            for s, r in zip(mine, regraded)
        ]
        assert sum(direct) + sum(via_choice) == pytest.approx(m["accuracy"] * len(mine))
        assert [s["correct"] for s in mine] == [bool(d) or v for d, v in zip(direct, via_choice)]
    assert sum(s["reason"].startswith("ok (matched") for s in samples) == 2

    table = (out / "table.md").read_text()
    assert "| tiny | 66.67 | - | - | - | - | - | 66.67 |" in table
    assert "| tiny | 50.00 | - | 50.00 |" in table


def test_end_to_end_truncation_and_raw_prompts(tiny_model, text_benches, tmp_path):
    """5 new tokens cut the box ("\\boxe"): every sample is an extraction failure, truncated, scored 0.
    Without the chat template the prompt does not end in the chain's "\\n": no "\\boxed{2}" then."""
    arith, _ = text_benches
    rc = main([
        "--model", tiny_model, "--benchmarks", f"mine={arith}", "--output-dir", str(tmp_path / "cut"),
        "--backend", "hf", "--max-new-tokens", "5", "--no-progress", "--temperature", "0",
    ])
    assert rc == 0
    m = json.loads((tmp_path / "cut" / "results.json").read_text())["benchmarks"]["mine"]
    assert m["accuracy"] == 0.0 and m["extraction_failure_rate"] == 1.0 and m["truncated_rate"] == 1.0
    assert "pass@1" not in m and "mean@1" not in m
    table = (tmp_path / "cut" / "table.md").read_text()
    assert "## Other benchmarks" in table and "| Model | mine |" in table and "| tiny_qwen2" in table

    rc = main([
        "--model", tiny_model, "--benchmarks", f"mine={arith}", "--output-dir", str(tmp_path / "raw"),
        "--backend", "hf", "--max-new-tokens", "10", "--no-progress", "--no-chat-template", "--limit", "2",
    ])
    assert rc == 0
    samples = [json.loads(line) for line in (tmp_path / "raw" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["response"] != "\\boxed{2}" for s in samples)


@pytest.mark.skipif(
    os.environ.get("SAPO_EVAL_VLLM") != "1",
    reason="vLLM start-up takes minutes; set SAPO_EVAL_VLLM=1 to run (works on CPU, ~2 min on 2 cores)",
)
def test_vllm_backend_same_answers(tiny_model, text_benches, tmp_path):
    """The vllm backend on the tiny bigram model gives the hf backend's answers (same chat template)."""
    arith, _ = text_benches
    out = tmp_path / "vllm"
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_sapo.eval", "--model", tiny_model, "--benchmarks", f"geo3k={arith}",
         "--output-dir", str(out), "--backend", "vllm", "--n-samples", "2", "--max-new-tokens", "12",
         "--max-model-len", "256", "--gpu-memory-utilization", "0.2", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "vllm"
    assert results["benchmarks"]["Geo3K"]["accuracy"] == pytest.approx(2 / 3)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {s["response"] for s in samples} == {"\\boxed{2}"}
    assert all(s["num_tokens"] == 10 and s["truncated"] is False for s in samples)


def test_hf_sampling_is_temperature_and_top_p_only(tiny_model):
    """The model's generation_config defaults (top_k, repetition_penalty: Qwen-VL ships both) are overridden."""
    import transformers

    backend = gen.HFBackend(tiny_model, gen.GenerationConfig(n_samples=3, max_new_tokens=12))
    backend.model.generation_config.top_k = 1
    backend.model.generation_config.repetition_penalty = 1.5
    seen = {}
    real = backend.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    backend.model.generate = spy
    ex = bm.Example(id="r", prompt="Solve it.", label="2", answer_type="number")
    (gens,) = backend.generate([ex])
    assert [g.text for g in gens] == ["\\boxed{2}"] * 3
    assert (seen["temperature"], seen["top_p"], seen["top_k"], seen["repetition_penalty"]) == (0.6, 0.95, 0, 1.0)
    assert seen["do_sample"] is True and seen["num_return_sequences"] == 3 and seen["max_new_tokens"] == 12
    assert isinstance(real.__self__, transformers.PreTrainedModel)


def test_render_prompt_uses_chat_template_and_image_items(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ex = bm.Example(id="r", prompt="Solve it.", label="1", answer_type="number")
    cfg = gen.GenerationConfig(system_prompt="Be brief.")
    assert gen.render_prompt(tok, ex, cfg) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSolve it.<|im_end|>\n<|im_start|>assistant\n"
    )
    vex = bm.Example(id="v", prompt="<image>Find x. <image> and y", label="1", answer_type="number", images=["a", "b"])
    assert gen.build_messages(vex)[-1]["content"] == [
        {"type": "image"}, {"type": "text", "text": "Find x."}, {"type": "image"}, {"type": "text", "text": "and y"}
    ]
    with pytest.raises(gen.GenerationSetupError, match="no chat template.*--no-chat-template"):
        tok.chat_template = None
        gen.render_prompt(tok, ex, gen.GenerationConfig())
    with pytest.raises(gen.GenerationSetupError, match="row 'v' has images"):
        gen.render_prompt(tok, vex, gen.GenerationConfig(chat_template=False))


def test_text_model_refuses_image_benchmarks(tiny_model, tmp_path):
    img = _png(tmp_path / "p.png")
    path = _write_jsonl(tmp_path / "v.jsonl", [{"id": "v1", "prompt": "<image>x?", "images": ["p.png"], "label": "1"}])
    rc = main(["--model", tiny_model, "--benchmarks", path, "--output-dir", str(tmp_path / "o"), "--backend", "hf"])
    assert rc == 2 and os.path.exists(img)


ITEM_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_vlm_generates_on_images_and_without_processor_says_so(tmp_path, capsys):
    """The demo's tiny Qwen2.5-VL (tokenizer + offline processor): image rows generate through the
    processor with the hf backend; with the processor files removed, image rows fail with a clear
    message while text rows still generate through the VLM class."""
    import os

    from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2_5_vl

    model = str(tmp_path / "vlm")
    build_tiny_qwen2_5_vl(model)
    _png(tmp_path / "a.png")
    images = _write_jsonl(
        tmp_path / "i.jsonl", [{"id": "i1", "prompt": "<image>x?", "images": ["a.png"], "label": "2"}]
    )
    rc = main(["--model", model, "--benchmarks", images, "--output-dir", str(tmp_path / "o1"), "--backend", "hf",
               "--max-new-tokens", "4", "--no-progress", "--trust-remote-code"])
    assert rc == 0
    rows = [json.loads(s) for s in (tmp_path / "o1" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["num_tokens"] <= 4

    for name in ("processor_config.json", "processing_qwen2_5_vl_no_video.py"):
        os.remove(os.path.join(model, name))
    text = _write_jsonl(tmp_path / "t.jsonl", [{"id": "t1", "prompt": "1+1?", "label": "2"}])
    rc = main(["--model", model, "--benchmarks", text, "--output-dir", str(tmp_path / "o"), "--backend", "hf",
               "--n-samples", "2", "--max-new-tokens", "4", "--no-progress"])
    assert rc == 0
    samples = (tmp_path / "o" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 and all(json.loads(s)["num_tokens"] <= 4 for s in samples)
    capsys.readouterr()
    rc = main(["--model", model, "--benchmarks", images, "--output-dir", str(tmp_path / "o2"), "--backend", "hf"])
    assert rc == 2
    assert "is a vision-language model but its processor cannot be loaded" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Oracle: canned responses through the real scoring, metrics and tables

ORACLE = {
    # Geo3K, n=2: 4 of 6 right, every prompt has a right one, 1 of 6 without \boxed{}
    "g1": ["so \\boxed{3}", "\\boxed{4}"],  # label 3
    "g2": ["The answer is \\boxed{(B)}", "I think B"],  # label B (choice); the second has no box
    "g3": ["\\boxed{7}", "<think>7</think> \\boxed{ 7 }"],  # label 7
    # MathVista, n=2: 0 of 4 right, 1 of 4 without a complete \boxed{}
    "m1": ["\\boxed{15 cm}", "\\boxed{A}"],  # label B ("12 cm"): option A's text, then its letter
    "m2": ["10, then \\boxed{", "\\boxed{11}"],  # label 10: unclosed box, wrong number
    # GSM8K: 2 of 2
    "s1": ["\\boxed{1,000}", "\\boxed{1000.0}"],  # label 1000
}


class OracleBackend:
    name = "oracle"

    def __init__(self, responses):
        self.responses = responses
        self.closed = False
        self.seen = []

    def generate(self, examples):
        self.seen.append([ex.id for ex in examples])
        return [list(self.responses[ex.id]) for ex in examples]

    def close(self):
        self.closed = True


@pytest.fixture
def oracle_benches(tmp_path):
    d = tmp_path / "benches"
    d.mkdir()
    _write_jsonl(d / "geo3k.jsonl", [
        {"id": "g1", "prompt": "p1", "label": "3", "answer_type": "number"},
        {"id": "g2", "prompt": "p2", "label": "B", "answer_type": "choice", "choices": ["1", "2", "3"]},
        {"id": "g3", "prompt": "p3", "label": 7},
    ])
    _write_jsonl(d / "MathVista_testmini.jsonl", [
        # label given as the option text: stored as its letter B; "15 cm" is option B's text
        {"id": "m1", "prompt": "p", "label": "12 cm", "answer_type": "choice", "choices": ["15 cm", "12 cm"]},
        {"id": "m2", "prompt": "p", "label": "10", "answer_type": "number"},
    ])
    _write_jsonl(d / "gsm8k.jsonl", [{"id": "s1", "prompt": "p", "label": "1000", "answer_type": "number"}])
    return d


def _run_oracle(monkeypatch, argv, responses=ORACLE):
    backend = OracleBackend(responses)
    calls = []

    def fake_create(name, model_path, config, benchmarks):
        calls.append((name, model_path, config))
        return backend

    monkeypatch.setattr(gen, "create_backend", fake_create)
    rc = main(argv)
    return rc, backend, calls


def test_oracle_metrics_and_tables(monkeypatch, oracle_benches, tmp_path):
    out = tmp_path / "out"
    rc, backend, calls = _run_oracle(monkeypatch, [
        "--model", "some/model", "--benchmarks", str(oracle_benches), "--output-dir", str(out),
        "--n-samples", "2", "--batch-size", "2", "--compare-paper", "3b", "--label", "oracle", "--backend", "hf",
        "--no-progress",
    ])
    assert rc == 0 and backend.closed
    (name, model, config), = calls
    assert (name, model) == ("hf", "some/model")
    assert (config.temperature, config.top_p, config.n_samples) == (0.6, 0.95, 2)
    assert backend.seen == [["g1", "g2"], ["g3"], ["m1", "m2"], ["s1"]]  # table order, batches of 2

    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "some/model" and results["label"] == "oracle"
    b = results["benchmarks"]
    assert list(b) == ["Geo3K", "MathVista", "GSM8K"]
    assert b["Geo3K"]["accuracy"] == pytest.approx(4 / 6) and b["Geo3K"]["mean@2"] == pytest.approx(4 / 6)
    assert b["Geo3K"]["pass@2"] == 1.0 and b["Geo3K"]["extraction_failure_rate"] == pytest.approx(1 / 6)
    # m1: label B ("12 cm"); "15 cm" is option A's text and "A" its letter: both wrong
    assert b["MathVista"]["accuracy"] == 0.0 and b["MathVista"]["pass@2"] == 0.0
    assert b["MathVista"]["extraction_failure_rate"] == pytest.approx(1 / 4)
    assert b["GSM8K"]["accuracy"] == 1.0 and b["GSM8K"]["pass@2"] == 1.0 and b["GSM8K"]["count"] == 1
    assert "truncated_rate" not in b["GSM8K"] and "mean_response_tokens" not in b["GSM8K"]
    assert results["averages"]["table1"] == {
        "accuracy": pytest.approx((4 / 6 + 0) / 2), "benchmarks": ["Geo3K", "MathVista"]
    }
    assert results["averages"]["text"]["accuracy"] == 1.0

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    by = {(s["id"], s["sample"]): s for s in samples}
    assert len(samples) == 12
    assert by[("g2", 1)]["extracted"] is None and by[("g2", 1)]["reason"] == "no \\boxed{} answer"
    assert by[("g2", 0)]["correct"] and by[("g3", 1)]["extracted"] == "7"
    assert by[("m1", 0)]["label"] == "B" and not by[("m1", 0)]["correct"]
    assert by[("m2", 0)]["extracted"] is None and not by[("m2", 0)]["correct"]

    table = (out / "table.md").read_text()
    assert "| Model | Geo3K | LogicVista | MathVerse | WeMath | MathVista | DynaMath | Avg |" in table
    assert "| paper 3B base | 27.29 | 34.45 | 24.75 | 21.81 | 61.60 | 10.97 | 30.15 |" in table
    assert "| paper 3B SAPO | 46.26 | 39.60 | 37.56 | 36.19 | 65.40 | 16.37 | 40.23 |" in table
    assert "| oracle | 66.67 | - | - | - | 0.00 | - | 33.33 |" in table
    assert "| Model | GSM8K | MATH500 | Avg |" in table and "| oracle | 100.00 | - | 100.00 |" in table
    assert "over the 2 benchmark(s) evaluated (Geo3K, MathVista)" in table and "excluded from Avg" in table
    assert "paper 3B SAPO 55.83" in table  # (46.26 + 65.40) / 2, the paper row over the same subset
    assert "| Geo3K | 3 | 2 | 66.67 | 100.00 | 16.67 | - |" in table  # details
    assert table.index("Table 1") < table.index("Text math") < table.index("Details")


def test_oracle_choice_text_counts_and_seven_b_rows(monkeypatch, tmp_path):
    path = _write_jsonl(tmp_path / "wemath.jsonl", [
        {"id": "w1", "prompt": "p", "label": "A", "answer_type": "choice", "choices": ["$\\frac{1}{2}$", "2"]},
        {"id": "w2", "prompt": "p", "label": "(B)", "answer_type": "choice", "choices": ["1", "2"]},
        {"id": "w3", "prompt": "p", "label": "B", "answer_type": "choice", "choices": ["1", "2"]},
        {"id": "w4", "prompt": "p", "label": "B", "answer_type": "choice", "choices": ["1", "2"]},
    ])
    responses = {
        "w1": ["\\boxed{\\frac{1}{2}}"],  # the option text of A: right
        "w2": ["\\boxed{\\text{B}}"],  # right
        "w3": ["\\boxed{1}"],  # option A's text: wrong
        "w4": ["\\boxed{" + "{" * 40 + "}" * 40 + "}"],  # refused by the grader (too deep): 0, no crash
    }
    rc, _, _ = _run_oracle(monkeypatch, [
        "--model", "m", "--benchmarks", path, "--output-dir", str(tmp_path / "o"), "--compare-paper", "7b",
        "--no-progress",
    ], responses)
    assert rc == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["benchmarks"]["WeMath"]["accuracy"] == 0.5
    assert "n_samples" in results["benchmarks"]["WeMath"] and "pass@1" not in results["benchmarks"]["WeMath"]
    table = (tmp_path / "o" / "table.md").read_text()
    assert "| m | - | - | - | 50.00 | - | - | 50.00 |" in table
    assert "| paper 7B SAPO | 52.75 | 47.30 | 45.81 | 42.86 | 70.70 | 21.96 | 46.90 |" in table
    assert "| paper 7B base | 42.60 | 39.15 | 30.58 | 32.67 | 69.30 | 13.37 | 37.94 |" in table
    assert "Text math" not in table


def test_paper_rows_match_spec():
    """The published rows are SAPO_SPEC section 7's (checked against the file when it is present)."""
    spec = "/work/shared/SAPO_SPEC.md"
    for key, rows in report.PAPER_TABLE1.items():
        for method, values, avg in rows:
            assert abs(sum(values) / 6 - avg) < 0.006, (key, method)  # published Avg = mean of the six
    if not os.path.exists(spec):
        pytest.skip("SAPO_SPEC.md not available")
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    for key, rows in report.PAPER_TABLE1.items():
        section = text[text.index(f"| {key.upper()} | Geo3K"):]
        for method, values, avg in rows:
            line = f"| {method} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {avg:.2f} |"
            assert line in section, line


def test_metrics_function():
    per_prompt = [
        [{"correct": c, "extracted": e} for c, e in ((True, "1"), (False, None), (False, "2"))],
        [{"correct": c, "extracted": e} for c, e in ((False, "3"), (False, "4"), (False, None))],
    ]
    m = report.benchmark_metrics(per_prompt, 3)
    assert m["accuracy"] == pytest.approx(1 / 6) and m["mean@3"] == m["accuracy"] and m["pass@3"] == 0.5
    assert m["extraction_failure_rate"] == pytest.approx(2 / 6) and m["count"] == 2 and m["num_generations"] == 6


# --------------------------------------------------------------------------------------------
# Loading and bad input


def test_load_data_prep_outputs(tmp_path):
    """The rows `openrlhf_sapo.data.geo3k/gsm8k` write load as they are (folder or test.jsonl)."""
    from openrlhf_sapo.data import geo3k, gsm8k

    raw = tmp_path / "raw"
    raw.mkdir()
    _png(raw / "fig0.png")
    _write_jsonl(raw / "test.jsonl", [
        {"problem": "<image>Find x.", "answer": "3", "images": ["fig0.png"]},
        {"problem": "Find y.", "answer": "\\frac{1}{2}", "images": ["fig0.png"]},
    ])
    _write_jsonl(raw / "gsm_test.jsonl", [{"question": "How many?", "answer": "Work.\n#### 1,234"}])
    geo_raw, gsm_raw = f"test={raw / 'test.jsonl'}", f"test={raw / 'gsm_test.jsonl'}"
    assert geo3k.main(["--output-dir", str(tmp_path / "geo"), "--from-disk", geo_raw, "--no-progress"]) == 0
    assert gsm8k.main(["--output-dir", str(tmp_path / "gsm"), "--from-disk", gsm_raw, "--no-progress"]) == 0
    assert geo3k.main([
        "--output-dir", str(tmp_path / "georel"), "--from-disk", f"test={raw / 'test.jsonl'}", "--no-progress",
        "--relative-image-paths", "--datasource", "geometry3k",
    ]) == 0

    geo, gsm = bm.load_benchmarks([str(tmp_path / "geo"), str(tmp_path / "gsm" / "test.jsonl")])
    assert (geo.name, gsm.name) == ("Geo3K", "GSM8K")
    assert geo.multimodal and not gsm.multimodal
    assert [ex.id for ex in geo.examples] == ["geo3k/test/0", "geo3k/test/1"]
    assert all(os.path.isfile(p) and os.path.isabs(p) for ex in geo.examples for p in ex.images)
    assert geo.examples[1].prompt.startswith("<image>Find y.")  # the tag geo3k put in front
    assert gsm.examples[0].label == "1234" and gsm.examples[0].answer_type == "number"
    assert "\\boxed{}" in gsm.examples[0].prompt

    rel, = bm.load_benchmarks([f"geo3k={tmp_path / 'georel' / 'test.jsonl'}"])
    assert rel.examples[0].images == [str(tmp_path / "georel" / "images" / "test" / "0.png")]
    assert bm.load_file(str(tmp_path / "georel" / "test.jsonl")).name == "Geo3K"  # datasource geometry3k


def test_load_formats_and_names(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _png(d / "a.png")
    _write_jsonl(d / "math500.jsonl", [
        {"id": 1, "prompt": "p", "label": 0.5},
        "",
        {"prompt": "<image>q", "images": "a.png", "label": "two", "answer_type": "text", "benchmark": "x"},
    ])
    _write_jsonl(d / "my_set.jsonl", [{"prompt": "p", "label": "1"}])
    benches = bm.load_benchmarks([str(d)], limit=1)
    assert [b.name for b in benches] == ["MATH500", "my_set"]
    assert benches[0].examples[0].id == "1" and benches[0].examples[0].label == "0.5"
    full = bm.load_file(str(d / "math500.jsonl"))
    assert len(full.examples) == 2 and full.examples[1].id == "math500/3"
    assert full.examples[1].answer_type == "auto" and full.examples[1].images == [str(d / "a.png")]
    assert bm.canonical_name("MathVista_testmini") == "MathVista" and bm.canonical_name("Foo") == "Foo"
    with pytest.raises(bm.BenchmarkError, match="given twice"):
        bm.load_benchmarks([f"gsm8k={d / 'my_set.jsonl'}", f"GSM8K={d / 'math500.jsonl'}"])


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "r7", "prompt": "p"}, r"bad\.jsonl, row 'r7' \(line 2\): no label"),
        ({"id": "r7", "prompt": "p", "label": ""}, r"row 'r7' \(line 2\): label must be non-empty"),
        ({"id": "r7", "label": "1"}, r"row 'r7' \(line 2\): no prompt"),
        ({"id": "r7", "prompt": "<image>p", "label": "1", "images": ["nope.png"]},
         r"bad\.jsonl, row 'r7' \(line 2\): image 'nope\.png' does not exist"),
        ({"id": "r7", "prompt": "<image><image>p", "label": "1", "images": ["ok.png"]},
         r"2 <image> tag\(s\) but .* 1 image"),
        ({"id": "r7", "prompt": "p", "label": "1", "answer_type": "words"}, r"answer_type 'words' is not one of"),
        ({"id": "r7", "prompt": "p", "label": "E", "answer_type": "choice", "choices": ["1", "2"]},
         r"option letter \(A-B or the text"),
        ({"id": "r1", "prompt": "p", "label": "1"}, r"row id 'r1' appears twice \(lines 1 and 2\)"),
        ("{not json", r"bad\.jsonl, line 2: invalid JSON"),
    ],
)
def test_bad_rows(tmp_path, row, message):
    _png(tmp_path / "ok.png")
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"id": "r1", "prompt": "p", "label": "1"}, row])
    with pytest.raises(bm.BenchmarkError, match=message):
        bm.load_file(path)


def test_cli_errors(tmp_path, monkeypatch, capsys):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"id": "r1", "prompt": "p", "label": "1"}])
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"id": "r1", "prompt": "p", "label": "1"}, {"id": "x9", "prompt": "p"}])
    base = ["--model", "m", "--output-dir", str(tmp_path / "out"), "--no-progress"]

    def fail(*a, **k):
        raise AssertionError("no backend may be created for bad input")

    monkeypatch.setattr(gen, "create_backend", fail)
    cases = [
        (["--benchmarks", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["--benchmarks", good, bad], "bad.jsonl, row 'x9' (line 2): no label"),
        (["--benchmarks", good, "--n-samples", "0"], "--n-samples must be >= 1"),
        (["--benchmarks", good, "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--benchmarks", str(tmp_path / "empty_dir")], "empty_dir does not exist"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "results.json")

    # An existing run is not overwritten without --overwrite.
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "results.json").write_text("{}")
    assert main(base + ["--benchmarks", good]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_module_entry_point_reports_bad_input(tmp_path):
    bad = _write_jsonl(tmp_path / "b.jsonl", [{"id": "q1", "prompt": "<image>p", "label": "1", "images": ["gone.png"]}])
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_sapo.eval", "--model", "m", "--benchmarks", bad,
         "--output-dir", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "b.jsonl, row 'q1' (line 1): image 'gone.png' does not exist" in proc.stderr


def test_choose_backend(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gen.choose_backend("auto") == "hf"
    assert gen.choose_backend("vllm") == "vllm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    assert gen.choose_backend("auto") == "hf"
    monkeypatch.setitem(sys.modules, "vllm", type(sys)("vllm"))
    assert gen.choose_backend("auto") == "vllm"
    with pytest.raises(gen.GenerationSetupError, match="unknown backend"):
        gen.choose_backend("tgi")
