"""The math reward: grading API (openrlhf_sapo/rewards/grading.py) and the OpenRLHF entry point
(openrlhf_sapo/rewards/math_reward.py), including upstream's own loader and consumer code.

What is faked: the tokenizer (character-level: one id per character, decode = join) and the vLLM
engine (returns a fixed response) handed to upstream's SingleTurnAgentExecutor.execute.
"""

import asyncio
import importlib.util
import logging
import math
import os
import shutil
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openrlhf_sapo.rewards import answer_types, grading, verifier_pool
from openrlhf_sapo.rewards.grading import (
    extract_final_answer,
    format_score,
    is_equivalent,
    response_from_query,
    score_response,
    score_responses,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REWARD_FILE = os.path.join(REPO, "openrlhf_sapo", "rewards", "math_reward.py")
HOSTILE_TIMEOUT = 0.5
MARGIN = 1.0  # seconds allowed beyond the timeout (process kill, scheduling on a loaded 2-core machine)

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def qwen_query(user: str, response: str, image_pads: int = 0) -> str:
    """A Qwen2.5-VL query as OpenRLHF decodes it: prompt + response, special tokens kept, pads expanded."""
    vision = "<|vision_start|>" + "<|image_pad|>" * image_pads + "<|vision_end|>" if image_pads else ""
    return f"{QWEN_SYSTEM}<|im_start|>user\n{vision}{user}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>"


INSTRUCTION = "Think in <think></think>, then put the final answer in \\boxed{}. E.g. \\boxed{7}."


@pytest.fixture(scope="module", autouse=True)
def warm_verifier():
    grading.configure_verifier(workers=2, prestart=True)
    assert score_response("\\boxed{x+1}", "1+x")["accuracy"] == 1.0  # waits for the worker imports once
    yield


# ---------------------------------------------------------------- equivalence table

EQUIVALENT = [
    ("12", "12", "auto"),
    ("12.0", "12", "auto"),
    ("12.00", "12.0", "number"),
    ("1,000", "1000", "auto"),
    ("1000", "1,000", "auto"),
    ("$12$", "12", "auto"),
    ("12 \\text{ cm}", "12", "auto"),
    ("0.75", "\\frac{3}{4}", "auto"),
    ("\\frac{3}{4}", "0.75", "auto"),
    ("\\dfrac34", "0.75", "number"),
    ("2\\sqrt{3}", "\\sqrt{12}", "auto"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}2", "expression"),
    ("x+1", "1+x", "expression"),
    ("30^\\circ", "30", "auto"),
    ("30", "30^\\circ", "auto"),
    ("30^{\\circ}", "30^\\circ", "auto"),
    ("\\{1,2\\}", "\\{2,1\\}", "auto"),
    ("x=3", "3", "auto"),
    ("B", "(B)", "auto"),
    ("(B)", "B", "auto"),
    ("\\text{(C)}", "C", "auto"),
    ("(B) 12", "B", "auto"),
    ("b", "B", "choice"),
    ("3", "\\boxed{3}", "auto"),  # a label given as a boxed solution
]

NOT_EQUIVALENT = [
    ("13", "12", "auto"),
    ("-12", "12", "auto"),
    ("12.5", "12", "auto"),
    ("12", "1,200", "auto"),
    ("1,2", "12", "auto"),
    ("\\frac{1}{3}", "0.33", "auto"),
    ("2\\sqrt{2}", "2\\sqrt{3}", "auto"),
    ("\\pi", "3.14", "auto"),
    ("x+2", "1+x", "expression"),
    ("A", "B", "auto"),
    ("12", "B", "auto"),  # no option letter
    ("(A) 12", "(B)", "choice"),
]


@pytest.mark.parametrize("answer,label,answer_type", EQUIVALENT)
def test_equivalent_in_process_and_through_the_worker(answer, label, answer_type):
    assert is_equivalent(answer, label, answer_type)
    result = score_response(f"<think>...</think> so \\boxed{{{answer}}}", label, answer_type, format_weight=0.0)
    assert (result["accuracy"], result["reward"], result["reason"]) == (1.0, 1.0, "ok")


@pytest.mark.parametrize("answer,label,answer_type", NOT_EQUIVALENT)
def test_wrong_answers_stay_wrong(answer, label, answer_type):
    assert not is_equivalent(answer, label, answer_type)
    result = score_response(f"\\boxed{{{answer}}}", label, answer_type, format_weight=0.0)
    assert result["accuracy"] == 0.0 and result["reward"] == 0.0


def test_choice_reasons_and_auto_guess():
    assert score_response("\\boxed{12}", "B")["reason"] == "no option letter in answer"
    assert score_response("\\boxed{B}", "12", "choice")["reason"] == "label is not an option letter"
    # "auto" takes only A-E as option letters; "F" is then an expression, which math-verify lowercases
    guess = lambda label: answer_types.guess_answer_type(label, for_grader=True)  # noqa: E731
    assert guess("(F)") == "expression" and guess("(E)") == "choice"
    assert guess("1,000") == "number" and guess("2\\sqrt{3}") == "expression"


def test_is_equivalent_rejects_bad_arguments_loudly():
    with pytest.raises(TypeError, match="label must be str, got NoneType"):
        is_equivalent("1", None)
    with pytest.raises(ValueError, match="answer_type must be one of"):
        is_equivalent("1", "1", "numeric")
    assert is_equivalent("2\\sqrt{3}", "\\sqrt{12}", timeout_s=2.0)  # through the helper process


# ---------------------------------------------------------------- extraction


def test_last_boxed_wins_and_fbox_and_nested_braces():
    assert extract_final_answer("\\boxed{1} then \\boxed{2} finally \\boxed{\\frac{3}{4}}.") == "\\frac{3}{4}"
    assert extract_final_answer("first \\boxed{1}, final \\fbox{ 5 }") == "5"
    assert extract_final_answer("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"  # escaped braces do not close the box
    assert extract_final_answer("\\boxed {x^{2}}") == "x^{2}"
    assert extract_final_answer("\\boxed{3} ... \\boxed{4") == "3"  # a box left open (truncated) is skipped
    assert extract_final_answer("no box here") is None
    assert extract_final_answer("\\boxed{}") == ""
    assert score_response("\\boxed{}", "1")["reason"] == "empty \\boxed{} answer"


def test_boxed_in_the_prompt_is_never_picked_qwen_transcript_with_image_pads():
    query = qwen_query(INSTRUCTION, "<think>I am not sure.</think> The answer is 5.", image_pads=4096)
    assert extract_final_answer(query) is None
    assert score_response(query, "7")["reason"] == "no \\boxed{} answer"
    assert score_response(query, "7")["reward"] == 0.0

    query = qwen_query(INSTRUCTION, "<think>2+3</think> The answer is \\boxed{5}.", image_pads=4096)
    assert extract_final_answer(query) == "5"
    assert score_response(query, "5") == {"reward": 1.0, "accuracy": 1.0, "format": 1.0, "reason": "ok", "answer": "5"}
    assert score_response(query, "7")["reward"] == pytest.approx(0.1)


def test_response_from_query_without_chat_template_uses_the_prompt():
    prompt = "Question: 2+3? Put the answer in \\boxed{}, e.g. \\boxed{7}.\nAnswer:"
    assert response_from_query(prompt + " It is 5.", prompt) == " It is 5."
    assert extract_final_answer(response_from_query(prompt + " It is 5.", prompt)) is None
    # decoded prompt differs at the start (tokenizer round trip): cut after the prompt's tail
    assert response_from_query("  " + prompt[1:] + " \\boxed{5}", prompt) == " \\boxed{5}"
    assert response_from_query("unrelated \\boxed{5}", prompt) == "unrelated \\boxed{5}"


# ---------------------------------------------------------------- format term and weights


@pytest.mark.parametrize(
    "response,expected",
    [
        ("<think>a</think>\\boxed{1}", 1.0),
        ("<think>a\nb</think>\n\nSo the answer is \\boxed{1}.<|im_end|>", 1.0),
        ("\n<think>a</think> \\boxed{1}\n", 1.0),
        ("<|im_start|>assistant\n<think>a</think>\\boxed{1}<|im_end|><|endoftext|>", 1.0),
        ("<think>a</think> the answer is 1", 0.0),  # no box
        ("<think>a \\boxed{1}</think> done", 0.0),  # box only inside the thinking
        ("<think>a \\boxed{1}", 0.0),  # thinking never closed
        ("So <think>a</think>\\boxed{1}", 0.0),  # does not start with <think>
        ("<think>a</think>\\boxed{1", 0.0),  # box never closed
        ("\\boxed{1}", 0.0),
    ],
)
def test_format_score(response, expected):
    assert format_score(response) == expected


def test_reward_weights():
    good = "<think>x</think>\\boxed{5}"
    unformatted = "\\boxed{5}"
    assert score_response(good, "5")["reward"] == pytest.approx(1.0)
    assert score_response(unformatted, "5")["reward"] == pytest.approx(0.9)
    assert score_response("<think>x</think>\\boxed{4}", "5")["reward"] == pytest.approx(0.1)
    assert score_response(good, "5", format_weight=0.0)["reward"] == 1.0
    assert score_response(unformatted, "5", format_weight=0.0)["reward"] == 1.0
    assert score_response("<think>x</think>\\boxed{4}", "5", format_weight=0.0)["reward"] == 0.0
    assert score_response("<think>x</think>\\boxed{4}", "5", format_weight=0.3)["reward"] == pytest.approx(0.3)
    bad = score_response(good, "5", format_weight=1.5)
    assert bad["reward"] == 0.0 and bad["reason"].startswith("bad argument: format_weight must be in [0, 1]")


# ---------------------------------------------------------------- hostile inputs, time bound


def _timed(response, label="5", timeout_s=HOSTILE_TIMEOUT):
    started = time.monotonic()
    result = score_response(response, label, timeout_s=timeout_s)
    return result, time.monotonic() - started


@pytest.mark.parametrize("answer", ["9^{9^{9^{9}}}", "2^{2^{30}}", "(10^{6})!"])
def test_power_towers_time_out(answer):
    result, wall = _timed(f"<think>t</think>\\boxed{{{answer}}}")
    assert result["accuracy"] == 0.0 and result["reason"] == f"timeout after {HOSTILE_TIMEOUT}s", result
    assert result["reward"] == pytest.approx(0.1)  # the format term still counts
    assert wall < HOSTILE_TIMEOUT + MARGIN, wall
    assert score_response("\\boxed{2\\sqrt{3}}", "\\sqrt{12}")["accuracy"] == 1.0  # the worker still serves


def test_hard_kill_when_the_worker_does_not_answer(monkeypatch):
    # The worker's own SIGALRM normally interrupts sympy first; set it after the parent's deadline so
    # the parent's kill-and-restart path runs (what happens to a computation stuck in C).
    monkeypatch.setattr(verifier_pool, "_SOFT_TIMEOUT_FRACTION", 20.0)
    pool = grading._default_pool()
    pool.prestart()
    assert score_response("\\boxed{x+3}", "3+x")["accuracy"] == 1.0
    restarts = pool.restarts
    result, wall = _timed("\\boxed{9^{9^{9^{9}}}}", timeout_s=0.5)
    assert result["reason"] == "timeout after 0.5s" and result["accuracy"] == 0.0
    assert wall < 0.5 + MARGIN, wall
    assert pool.restarts == restarts + 1
    assert score_response("\\boxed{2\\sqrt{3}}", "\\sqrt{12}")["accuracy"] == 1.0  # the restarted worker serves


def test_a_batch_continues_after_a_timeout(monkeypatch):
    monkeypatch.setattr(verifier_pool, "_SOFT_TIMEOUT_FRACTION", 20.0)
    started = time.monotonic()
    results = score_responses(
        ["\\boxed{x+1}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{2\\sqrt{3}}"], ["1+x", "5", "\\sqrt{12}"], timeout_s=0.5
    )
    assert [r["reason"] for r in results] == ["ok", "timeout after 0.5s", "ok"]
    assert [r["accuracy"] for r in results] == [1.0, 0.0, 1.0]
    assert time.monotonic() - started < 0.5 + MARGIN + 2.0  # + one worker restart


def test_a_killed_worker_is_replaced():
    pool = grading._default_pool()
    pool.prestart()
    grading.score_response("\\boxed{x+2}", "2+x")
    restarts = pool.restarts
    pids = pool.pids()
    assert pids
    for pid in pids:
        os.kill(pid, 9)
    assert score_response("\\boxed{x+2}", "2+x")["accuracy"] == 1.0
    assert pool.restarts >= restarts + 1 and not set(pool.pids()) & set(pids)


def test_a_helper_that_cannot_start_fails_loudly_at_check_and_scores_zero(monkeypatch):
    broken = grading.VerifierPool(workers=1, memory_mb=1)  # a 1 MB address space: the helper cannot start
    with pytest.raises(RuntimeError, match="helper process could not start: worker failed to start"):
        broken.check()
    monkeypatch.setattr(grading, "_POOL", broken)
    result = score_response("\\boxed{2\\sqrt{3}}", "\\sqrt{12}")
    assert result["accuracy"] == 0.0 and result["reason"].startswith("verifier unavailable: ")
    assert score_response("\\boxed{12}", "12")["accuracy"] == 1.0  # plain numbers never need the helper


@pytest.mark.parametrize(
    "answer,reason_start",
    [
        ("{" * 500_000 + "}" * 500_000, "answer too long (1000000 chars > 1000)"),  # 1 MB of nested braces
        ("\\frac{1}{" * 10_000 + "2" + "}" * 10_000, "answer too long"),  # \frac nested 10k deep
        ("\\frac{1}{" * 40 + "2" + "}" * 40, "answer nesting too deep (depth 40 > 32)"),
        ("1" * 5000, "answer too long"),
    ],
)
def test_huge_or_deep_answers_are_refused_before_sympy(answer, reason_start):
    # the cost is one linear scan here (about 0.3 s for 1 MB), whatever the timeout
    result, wall = _timed("<think>t</think>\\boxed{" + answer + "}", timeout_s=grading.DEFAULT_TIMEOUT_S)
    assert result["reason"].startswith(reason_start) and result["accuracy"] == 0.0
    assert result["reward"] == pytest.approx(0.1)
    assert wall < 2.0, wall


def test_megabytes_without_an_answer_are_cheap():
    result, wall = _timed("<think>" + "\\frac{" * 1_000_000, timeout_s=grading.DEFAULT_TIMEOUT_S)
    assert result["reason"] == "no \\boxed{} answer" and wall < 2.0, wall


# ---------------------------------------------------------------- threads and event loops


def test_from_a_non_main_thread():
    out = {}

    def work():
        try:
            out["score"] = score_response("<think>t</think>\\boxed{2\\sqrt{3}}", "\\sqrt{12}")
            out["in_process"] = is_equivalent("2\\sqrt{3}", "\\sqrt{12}")  # math-verify's alarm is not used here
            out["hostile"] = score_response("\\boxed{9^{9^{9^{9}}}}", "5", timeout_s=HOSTILE_TIMEOUT)
        except BaseException as e:  # surfaced below
            out["error"] = e

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert "error" not in out, out.get("error")
    assert out["score"]["reward"] == 1.0 and out["in_process"] is True
    assert out["hostile"]["reason"] == f"timeout after {HOSTILE_TIMEOUT}s"


def test_inside_a_running_event_loop(reward_module):
    async def main():
        direct = score_response("\\boxed{\\frac{3}{4}}", "0.75")  # blocking call inside the loop
        # as upstream calls it: asyncio.to_thread(reward_func, [query], [prompt], [label]), concurrently
        queries = [qwen_query("q", f"<think>t</think>\\boxed{{{k}}}") for k in range(8)]
        outs = await asyncio.gather(
            *[asyncio.to_thread(reward_module.reward_func, [q], ["prompt"], ["3"]) for q in queries]
        )
        return direct, outs

    direct, outs = asyncio.run(main())
    assert direct["accuracy"] == 1.0
    assert [o["scores"].tolist() for o in outs] == [[1.0 if k == 3 else 0.0] for k in range(8)]


# ---------------------------------------------------------------- the OpenRLHF entry point


@pytest.fixture(scope="module")
def reward_module():
    import openrlhf_sapo.rewards.math_reward as module

    return module


def _load_by_path(path, name="reward_func"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reward_func_structure(reward_module):
    query = qwen_query(INSTRUCTION, "<think>t</think>\\boxed{5}", image_pads=64)
    out = reward_module.reward_func([query], ["prompt"], ["5"])
    assert set(out) == {"rewards", "scores", "extra_logs"}
    assert out["rewards"].dtype == torch.float32 and out["rewards"].shape == (1,)
    assert out["rewards"].tolist() == [1.0] and out["scores"].tolist() == [1.0]
    assert set(out["extra_logs"]) == {"accuracy", "format", "has_answer", "verifier_timeout"}
    for value in out["extra_logs"].values():
        assert isinstance(value, torch.Tensor) and value.shape == (1,)

    batch = reward_module.reward_func(
        [qwen_query("q", "\\boxed{5}"), qwen_query("q", "<think>t</think>\\boxed{4}"), qwen_query("q", "none")],
        ["p"] * 3,
        ["5", "5", "5"],
    )
    assert batch["rewards"].tolist() == pytest.approx([0.9, 0.1, 0.0])
    assert batch["scores"].tolist() == [1.0, 0.0, 0.0]  # accuracy, not the shaped reward
    assert batch["extra_logs"]["format"].tolist() == [0.0, 1.0, 0.0]
    assert batch["extra_logs"]["has_answer"].tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "queries,prompts,labels,n",
    [
        (["\\boxed{5}"], ["p"], [None], 1),
        (["\\boxed{5}"], ["p"], [b"5"], 1),
        (["\\boxed{5}"], ["p"], [["5"]], 1),
        ([b"\\boxed{5}"], ["p"], ["5"], 1),
        ([None, "\\boxed{5}"], None, ["5", "5"], 2),
        (["\\boxed{5}", "\\boxed{5}"], ["p"], ["5"], 2),  # mismatched lengths
        ("\\boxed{5}", "p", "5", 1),  # not lists
        (None, None, None, 1),
    ],
)
def test_reward_func_never_raises_on_garbage(reward_module, queries, prompts, labels, n):
    out = reward_module.reward_func(queries, prompts, labels)
    assert out["rewards"].shape == (n,) and out["scores"].shape == (n,)
    assert all(v.shape == (n,) for v in out["extra_logs"].values())
    assert torch.isfinite(out["rewards"]).all() and ((out["rewards"] >= 0) & (out["rewards"] <= 1)).all()
    if queries == [None, "\\boxed{5}"]:
        assert out["rewards"].tolist() == pytest.approx([0.0, 0.9])  # only the bad sample is zeroed
    else:
        assert out["rewards"].tolist() == [0.0] * n


def test_labels_may_be_numbers_but_not_bools():
    assert score_response("\\boxed{12}", 12)["accuracy"] == 1.0
    assert score_response("\\boxed{0.5}", 0.5)["accuracy"] == 1.0
    assert score_response("\\boxed{1}", True)["reason"] == "bad label type: bool"


def test_each_reason_kind_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(grading, "_LOGGED_KINDS", set())
    with caplog.at_level(logging.INFO, logger="openrlhf_sapo.rewards"):
        for label in (None, None, b"x", 3j):
            assert score_response("\\boxed{1}", label)["reward"] == 0.0
        for _ in range(3):
            score_response("no answer", "1")
    messages = [r.getMessage() for r in caplog.records if r.name == "openrlhf_sapo.rewards"]
    assert len([m for m in messages if "bad label type" in m]) == 1, messages
    assert len([m for m in messages if "no \\boxed{} answer" in m]) == 1, messages


def test_loaded_by_upstream_loader_and_run_through_upstream_consumers():
    """Upstream's SingleTurnAgentExecutor loads the file by path and computes the reward in execute();
    the SamplesGenerator turns its output into an Experience (rewards, scores, info)."""
    from openrlhf_sapo.utils import cpu_compat

    cpu_compat.apply()
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(remote_rm_url=REWARD_FILE)
    assert executor.reward_func.__module__ == "reward_func"  # upstream's module name for the file

    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
            return {"input_ids": torch.tensor([[ord(c) for c in text]])}

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids)

    class FakeEngine:
        def __init__(self, text):
            self.text = text

        async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
            output = SimpleNamespace(
                token_ids=[ord(c) for c in self.text], text=self.text, finish_reason="stop", logprobs=None
            )
            return SimpleNamespace(outputs=[output])

    prompt = qwen_query(INSTRUCTION, "", image_pads=256)[: -len("<|im_end|>")]  # ends with the generation prompt
    params = SimpleNamespace(max_tokens=128, logprobs=None)

    def run(response_text, label):
        return asyncio.run(
            executor.execute(prompt, label, params, 8192, CharTokenizer(), FakeEngine(response_text + "<|im_end|>"))
        )

    right = run("<think>3+4</think> so \\boxed{7}", "7")
    unformatted = run("so \\boxed{7}", "7")
    prompt_box_only = run("<think>no idea</think>", "7")  # the prompt's \boxed{7} must not count
    garbage_label = run("<think>t</think>\\boxed{7}", None)
    assert right["reward"].tolist() == [1.0] and right["scores"].tolist() == [1.0]
    assert unformatted["reward"].tolist() == pytest.approx([0.9]) and unformatted["scores"].tolist() == [1.0]
    assert prompt_box_only["reward"].tolist() == [0.0] and prompt_box_only["scores"].tolist() == [0.0]
    assert garbage_label["reward"] is not None and garbage_label["reward"].tolist() == [0.0]

    experiences = [
        SamplesGenerator._process_response_into_experience(None, r, max_len=8192)
        for r in (right, unformatted, prompt_box_only)
    ]
    assert [e.rewards.tolist() for e in experiences] == [[1.0], pytest.approx([0.9]), [0.0]]
    for e in experiences:
        assert e.rewards.shape == (1,) and e.rewards.dtype == torch.float32 and e.scores.shape == (1,)
        for key in ("accuracy", "format", "has_answer", "verifier_timeout", "reward", "score"):
            assert e.info[key].shape == (1,), key
    # what dynamic filtering reads (samples_generator._generate_vllm) and what the trainer logs
    assert [e.scores[0].item() for e in experiences] == [1.0, 1.0, 0.0]
    assert [e.info["format"].item() for e in experiences] == [1.0, 0.0, 0.0]
    assert [e.info["accuracy"].item() for e in experiences] == [1.0, 1.0, 0.0]
    assert torch.cat([e.rewards for e in experiences]).shape == (3,)  # as compute_advantages_and_returns does


def test_import_and_path_load_share_the_grading_module(reward_module):
    by_path = _load_by_path(REWARD_FILE)
    assert by_path.grading is reward_module.grading is grading
    assert by_path.reward_func(["\\boxed{4}"], ["p"], ["4"])["scores"].tolist() == [1.0]


def test_path_load_of_a_copy_outside_the_package(tmp_path, monkeypatch):
    copy_dir = tmp_path / "rewards_copy"
    shutil.copytree(os.path.dirname(REWARD_FILE), copy_dir, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("SAPO_REWARD_PRESTART", "0")
    monkeypatch.setenv("SAPO_REWARD_FORMAT_WEIGHT", "0")
    module = _load_by_path(str(copy_dir / "math_reward.py"))
    try:
        assert module.grading is not grading
        assert os.path.samefile(module.grading.__file__, copy_dir / "grading.py")
        assert module.CONFIG["format_weight"] == 0.0
        out = module.reward_func(["\\boxed{2\\sqrt{3}}", "\\boxed{3}"], ["p", "p"], ["\\sqrt{12}", "4"])
        assert out["rewards"].tolist() == [1.0, 0.0]  # pure accuracy; the worker runs the copied grading.py
    finally:
        module.grading.shutdown_verifier()
        for name in [n for n in sys.modules if n.split(".")[0] == "_openrlhf_sapo_rewards"]:
            sys.modules.pop(name)


@pytest.mark.parametrize(
    "var,value,message",
    [
        ("SAPO_REWARD_FORMAT_WEIGHT", "abc", "SAPO_REWARD_FORMAT_WEIGHT='abc' is not a number"),
        ("SAPO_REWARD_FORMAT_WEIGHT", "1.5", r"must be in \[0.0, 1.0\]"),
        ("SAPO_REWARD_TIMEOUT", "0", r"SAPO_REWARD_TIMEOUT='0' must be in \(0.0, 3600.0\]"),
        ("SAPO_REWARD_ANSWER_TYPE", "numeric", "must be one of"),
        ("SAPO_REWARD_WORKERS", "0", "SAPO_REWARD_WORKERS='0' must be >= 1"),
    ],
)
def test_bad_configuration_fails_at_load_with_the_variable_name(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=message):
        _load_by_path(REWARD_FILE)


def test_configuration_from_the_environment(monkeypatch):
    monkeypatch.setenv("SAPO_REWARD_FORMAT_WEIGHT", "0")
    monkeypatch.setenv("SAPO_REWARD_TIMEOUT", "2.5")
    monkeypatch.setenv("SAPO_REWARD_ANSWER_TYPE", "choice")
    module = _load_by_path(REWARD_FILE)
    assert module.CONFIG["timeout_s"] == 2.5 and module.CONFIG["answer_type"] == "choice"
    out = module.reward_func(["<think>t</think>\\boxed{(B)}", "\\boxed{12}"], ["p", "p"], ["B", "12"])
    assert out["rewards"].tolist() == [1.0, 0.0]  # "12" is not an option letter under answer_type=choice


def test_defaults_match_the_release(monkeypatch):
    assert grading.DEFAULT_TIMEOUT_S == 5.0 and grading.DEFAULT_FORMAT_WEIGHT == 0.1
    for key in [k for k in os.environ if k.startswith("SAPO_REWARD_")]:
        monkeypatch.delenv(key)
    config = _load_by_path(REWARD_FILE).CONFIG
    assert (config["format_weight"], config["timeout_s"], config["answer_type"]) == (0.1, 5.0, "auto")


# ---------------------------------------------------------------- properties

# every piece has balanced braces, so the box always closes and the answer reaches grading
_LATEX_PIECES = ["1", "2", "9", "0", ".", ",", "+", "-", "*", "/", "^", "^{9}", "(", ")", "x", "=", "\\frac{1}{2}",
                 "\\frac", "\\sqrt", "\\sqrt{2}", "\\pi", "^\\circ", "\\infty", "\\{", "\\}", "!", " ",
                 "\\left(", "\\right)", "\\text{ cm}", "A", "(B)", "{x}", "{9^{9}}", "\\%"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300), st.text(max_size=30), st.sampled_from(grading.ANSWER_TYPES))
def test_arbitrary_text_gives_a_bounded_reward(response, label, answer_type):
    result = score_response(response, label, answer_type, timeout_s=0.5)
    for key in ("reward", "accuracy", "format"):
        assert math.isfinite(result[key]) and 0.0 <= result[key] <= 1.0
    assert isinstance(result["reason"], str) and result["reason"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(_LATEX_PIECES), max_size=25).map("".join),
    st.lists(st.sampled_from(_LATEX_PIECES), min_size=1, max_size=8).map("".join),
)
def test_arbitrary_latex_reaches_the_verifier_and_stays_bounded(answer, label):
    started = time.monotonic()
    result = score_response("<think>t</think>\\boxed{" + answer + "}", label, timeout_s=0.5)
    assert time.monotonic() - started < 0.5 + MARGIN + 2.0  # + at most one worker restart
    assert math.isfinite(result["reward"]) and 0.0 <= result["reward"] <= 1.0
    assert result["accuracy"] in (0.0, 1.0) and result["format"] == 1.0
    assert result["answer"] == answer.strip()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=50), st.none(), st.binary(max_size=5), st.integers()), max_size=4))
def test_reward_func_on_arbitrary_lists(values):
    import openrlhf_sapo.rewards.math_reward as module

    out = module.reward_func(values, values, list(reversed(values)))
    n = len(values)
    assert out["rewards"].shape == (n,) and out["scores"].shape == (n,)
    assert torch.isfinite(out["rewards"]).all() and ((out["rewards"] >= 0) & (out["rewards"] <= 1)).all()
