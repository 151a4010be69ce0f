"""The single-process backend's stand-ins for vLLM and Ray: the batched HF rollout engine behind
upstream's own agent executor, the in-process object store and actor group, and openrlhf_sapo.upstream.local_ray that
installs the store in upstream's modules. Tiny random models, no DeepSpeed: seconds."""

from __future__ import annotations

import asyncio
import types

import pytest
import torch

from openrlhf_sapo import upstream as sapo_upstream
from openrlhf_sapo.trainer.local.hf_engine import HFRolloutEngine
from openrlhf_sapo.trainer.local.launcher import LocalActorGroup, LocalHandle, LocalObjectStore, LocalRef


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2

    path = build_tiny_qwen2(str(tmp_path_factory.mktemp("engine") / "m"), hidden=64, heads=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, model, AutoTokenizer.from_pretrained(path)


def sampling(**kw):
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 8, "min_tokens": 1, **kw})


def prompts(tokenizer, n):
    texts = [f"{i}+{i + 1}=?" for i in range(n)]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in texts]
    return [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]


def run_requests(engine, token_lists, params):
    async def main():
        return await asyncio.gather(*(engine.generate(ids, params) for ids in token_lists))

    return asyncio.run(main())


def test_concurrent_requests_are_one_batched_generate(text_model):
    _, model, tokenizer = text_model
    engine = HFRolloutEngine(model, tokenizer, executor=None)
    calls = []
    original = engine._generate_batch
    engine._generate_batch = lambda requests: calls.append(len(requests)) or original(requests)
    outs = run_requests(engine, prompts(tokenizer, 6), sampling(temperature=0.0))
    assert calls == [6] and len(outs) == 6
    # Different sampling options are different batches.
    calls.clear()

    async def mixed():
        ids = prompts(tokenizer, 4)
        return await asyncio.gather(*(engine.generate(x, sampling(temperature=0.0 if i % 2 else 1.0)) for i, x in enumerate(ids)))

    asyncio.run(mixed())
    assert sorted(calls) == [2, 2]


def test_greedy_batch_equals_one_prompt_at_a_time(text_model):
    """Left padding in a batch changes nothing: each response equals generating its prompt alone."""
    _, model, tokenizer = text_model
    engine = HFRolloutEngine(model, tokenizer, executor=None)
    token_lists = prompts(tokenizer, 5)
    token_lists[2] = token_lists[2] + tokenizer("12", add_special_tokens=False)["input_ids"]  # unequal lengths
    batched = run_requests(engine, token_lists, sampling(temperature=0.0, max_tokens=10))
    for ids, out in zip(token_lists, batched):
        alone = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10, top_k=0, top_p=1.0,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        if tokenizer.eos_token_id in alone:
            alone = alone[: alone.index(tokenizer.eos_token_id) + 1]
        assert out.outputs[0].token_ids == alone


def test_log_probs_limits_and_finish_reasons(text_model):
    _, model, tokenizer = text_model
    engine = HFRolloutEngine(model, tokenizer, executor=None)
    ids = prompts(tokenizer, 3)

    async def main():
        return await asyncio.gather(*(engine.generate(x, sampling(max_tokens=m, logprobs=1, min_tokens=0)) for x, m in zip(ids, (3, 5, 8))))

    torch.manual_seed(0)
    outs = asyncio.run(main())
    for x, limit, out in zip(ids, (3, 5, 8), outs):
        completion = out.outputs[0]
        assert 1 <= len(completion.token_ids) <= limit
        assert completion.finish_reason == ("stop" if completion.token_ids[-1] == tokenizer.eos_token_id else "length")
        # Temperature 1, no top-k/top-p, no min_tokens (it masks EOS first, as in vLLM): the processed
        # log-probs are the model's own log-softmax.
        with torch.no_grad():
            logits = model(torch.tensor([x + completion.token_ids])).logits[0, len(x) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        got = torch.tensor([lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)  # vLLM's default


def test_load_weights_copies_and_checks(text_model):
    path, model, tokenizer = text_model
    from transformers import AutoModelForCausalLM

    engine = HFRolloutEngine(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer, executor=None)
    source = {n: (p.detach() + 1).to(torch.bfloat16) for n, p in model.named_parameters()}
    assert engine.load_weights(source.items()) == len(source)
    for n, p in engine.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, source[n].float())
    with pytest.raises(KeyError, match="no parameter"):
        engine.load_weights([("not.a.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="copied 1 of"):
        engine.load_weights(list(source.items())[:1])


def test_upstream_executor_reward_and_vision_tokens_suppressed(tmp_path):
    """Upstream's SingleTurnAgentExecutor drives the engine (VLM prompt through the processor, the
    reward file), and a random VLM never samples a vision special token."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from openrlhf_sapo.demo.tasks import get_task
    from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2_5_vl

    path = build_tiny_qwen2_5_vl(str(tmp_path / "vlm"))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    executor_cls = sapo_upstream.upstream("openrlhf.utils.agent", "SingleTurnAgentExecutor")
    reward_file = str(tmp_path / "reward.py")
    with open(reward_file, "w") as f:
        f.write("import torch\ndef reward_func(queries, prompts, labels):\n"
                "    return {'rewards': torch.tensor([float(len(q)) for q in queries]), 'scores': torch.zeros(len(queries)), 'extra_logs': {}}\n")
    engine = HFRolloutEngine(model, processor.tokenizer, executor_cls(reward_file), processor=processor)
    store = LocalObjectStore()
    handle = LocalHandle(engine, store)
    examples = get_task("digits").sample(3, "train", 0)
    chat = [processor.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e.prompt}]}],
                                                    tokenize=False, add_generation_prompt=True) for e in examples]
    refs = [handle.generate_responses.remote(prompt=c, label=e.label, sampling_params=sampling(max_tokens=24),
                                             max_length=200, hf_tokenizer=processor, num_samples=2, images=e.images)
            for c, e in zip(chat, examples)]
    assert not any(r.ready for r in refs)  # coroutine refs wait for a get/wait ...
    results = store.get(refs)  # ... which runs them all together
    assert [len(r) for r in results] == [2, 2, 2]
    banned = set(engine.suppress_ids)
    assert banned and len(banned) == 4
    for samples in results:
        for sample in samples:
            start, end = sample["action_ranges"][0]
            assert not banned & set(sample["observation_tokens"][start:end])
            assert sample["mm_train_inputs"]["pixel_values"].shape[0] > 0
            assert sample["reward"] > 0  # the reward file saw the query


def test_object_store_semantics():
    store = LocalObjectStore()
    assert store.get(store.put(3)) == 3
    ran = []

    class Target:
        def plain(self, x):
            return x + 1

        async def slow(self, x):
            ran.append(x)
            await asyncio.sleep(0)
            return x * 10

    handle = LocalHandle(Target(), store)
    plain = handle.plain.remote(1)
    assert plain.ready and store.get(plain) == 2
    pending = [handle.slow.remote(i) for i in range(3)]
    assert ran == [] and all(not r.ready for r in pending)
    ready, rest = store.wait(pending, num_returns=1)
    assert ran == [0, 1, 2]  # one wait ran every pending coroutine
    assert len(ready) == 1 and len(rest) == 2 and store.get(rest) == [10, 20]
    with pytest.raises(TypeError, match="LocalRef"):
        store.get(5)


def test_actor_group_dispatches_like_ray():
    store = LocalObjectStore()

    class Worker:
        def execute_batch(self, method_name, all_data, start, end):
            return [getattr(self, method_name)(**{k: v[i] for k, v in all_data.items()}) for i in range(start, end)]

        def forward(self, x):
            return x * 2

    group = LocalActorGroup(Worker(), store)
    assert store.get(group.async_run_method_batch("forward", x=[1, 2, 3])) == [[2, 4, 6]]
    assert store.get(group.async_run_method("forward", 4)) == [8]
    with pytest.raises(ValueError, match="one length"):
        group.async_run_method_batch("forward", x=[1], y=[1, 2])
    with pytest.raises(ValueError, match="world size 1"):
        LocalActorGroup(Worker(), store, duplicate_actors=2)


def test_local_ray_swaps_and_restores_upstream_ray(monkeypatch):
    import importlib

    originals = {name: importlib.import_module(name).ray for name in sapo_upstream.LOCAL_RAY_MODULES}
    store = LocalObjectStore()
    with sapo_upstream.local_ray(store):
        for name in sapo_upstream.LOCAL_RAY_MODULES:
            module = importlib.import_module(name)
            assert module.ray.get == store.get and module.ray.put == store.put
    for name, original in originals.items():
        assert importlib.import_module(name).ray is original
    # A module calling anything else on ray at run time is refused before the run starts.
    fake = types.ModuleType("fake_upstream_module")
    real_ray = originals[sapo_upstream.LOCAL_RAY_MODULES[0]]
    fake.ray = real_ray
    monkeypatch.setitem(__import__("sys").modules, "fake_upstream_module", fake)
    monkeypatch.setattr(sapo_upstream, "LOCAL_RAY_MODULES", ("fake_upstream_module",))
    monkeypatch.setattr(sapo_upstream.inspect, "getsource", lambda module: "ray.kill(actor)\nray.get(x)\n")
    with pytest.raises(sapo_upstream.UpstreamMismatch, match="kill"):
        with sapo_upstream.local_ray(store):
            pass
    assert fake.ray is real_ray  # refused before anything was swapped
