"""Real vLLM (CPU build): a pipeline-parallel engine started by our rollout actor class, against PP=1.

    python tests/vllm_pp_engine_check.py PAYLOAD

PAYLOAD (written by tests/test_vllm_pipeline_parallel.py with ray.cloudpickle) holds what Ray
would ship for one rollout engine after `apply_pipeline_parallel` with TP=1, PP=2: the remote
class's pickled class (by value) and the kwargs upstream's real `create_vllm_engines` gave its
`.remote(...)`; and two tiny random Qwen2 checkpoints A and B (tests/vllm_pp_tiny_model.py).
vLLM spawns processes, hence the `__main__` guard. Prints one line `RESULT=<json>` and exits 0,
or raises.

1. The class is unpickled in this fresh process with `openrlhf_sapo` imports blocked (so it works
   only if everything it needs travelled with it, P included) and its constructor, upstream's
   `RolloutRayActor.__init__` behind ours, runs with those kwargs; the kwargs it hands to
   `vllm.AsyncEngineArgs` are captured there (only `AsyncLLMEngine.from_engine_args`, the engine
   start, is skipped: an async engine costs an extra process start, ~15-30 s here).
2. A real vLLM engine (`vllm.LLM`) is started with exactly those kwargs, i.e. PP=2 (2 stages x 2
   layers), from checkpoint A, and greedy-decodes. Then every worker of every
   stage receives checkpoint B parameter by parameter, by HF name and full tensor, and does what
   OpenRLHF's `WorkerWrap.update_weight` does once the broadcast has arrived (dtype check,
   `model_runner.model.load_weights(weights=[(name, weight)])`), through `collective_rpc` like
   `update_weight`; the engine generates again.
3. The same kwargs without pipeline_parallel_size (PP=1) from checkpoint B: generate; sync A the
   same way; generate.
The test then checks PP=2 == PP=1 for the same weights, A != B, and that each stage loaded exactly
the parameters it owns.

Substitutions, CPU only: executor "mp" instead of "ray" (no Ray cluster in tests; vLLM's default
Ray executor, `RayExecutorV2`, is a `MultiprocExecutor` with Ray actors as workers), float32
instead of bfloat16, the worker extension below instead of WorkerWrap (whose `update_weight`
allocates on CUDA and broadcasts with NCCL), enforce_eager. tests/vllm_pp_worker_ext.py also works
around two CPU-build limits: linear/LM-head weights are kept as plain parameters (the CPU build
prepacks and drops them, so no running CPU engine can re-load weights, PP or not), and a non-first
stage's activation buffer is allocated after start-up (the CPU runner does so only in its warm-up
run, which enforce_eager=True skips; eager saves ~30-60 s of torch.compile per engine).
"""

from __future__ import annotations

import asyncio
import importlib.abc
import json
import os
import sys
import time

PROMPTS = [[10 + i, 70 + 3 * i, 33, 101 + i, 5] for i in range(6)]
MAX_TOKENS = 12
HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION = "vllm_pp_worker_ext.PipelineCheckExtension"


class _BlockOurPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "openrlhf_sapo" or name.startswith("openrlhf_sapo."):
            raise ImportError(f"{name} must not be needed to unpickle or run the rollout actor class")
        return None


def _sampling_params():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)


def _summarise(outputs):
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, tok)] for o, tok in zip(outputs, tokens)]
    return {"tokens": tokens, "logprobs": logprobs}


def _vllm_kwargs_from_actor(payload_path: str) -> tuple[dict, dict, list[str]]:
    """Unpickle the shipped class with openrlhf_sapo blocked, run its constructor (upstream's)
    and capture the kwargs it hands to vllm.AsyncEngineArgs; only the engine start is skipped."""
    import ray.cloudpickle as cloudpickle
    import vllm

    captured = []
    real_engine_args, real_from_engine_args = vllm.AsyncEngineArgs, vllm.AsyncLLMEngine.from_engine_args

    def engine_args(*args, **kwargs):
        assert not args
        captured.append(dict(kwargs))
        return real_engine_args(**kwargs)

    class _NotStarted:
        async def is_sleeping(self):
            return False

    blocker = _BlockOurPackage()
    sys.meta_path.insert(0, blocker)
    # upstream asks Ray's worker for the address only when this is unset; there is no Ray here
    os.environ["RAY_ADDRESS"] = "unused:0"
    vllm.AsyncEngineArgs = engine_args
    vllm.AsyncLLMEngine.from_engine_args = staticmethod(lambda args: _NotStarted())
    try:
        with open(payload_path, "rb") as f:
            payload = cloudpickle.load(f)
        actor_cls = payload["actor_class"]  # the class Ray instantiates in the worker
        actor = actor_cls.__new__(actor_cls)
        asyncio.run(actor_cls.__init__(actor, **payload["kwargs"]))
        assert "openrlhf_sapo" not in sys.modules
    finally:
        vllm.AsyncEngineArgs, vllm.AsyncLLMEngine.from_engine_args = real_engine_args, real_from_engine_args
        os.environ.pop("RAY_ADDRESS", None)
        sys.meta_path.remove(blocker)
    (kwargs,) = captured
    shipped = {"class": actor_cls.__name__, "pipeline_parallel_size": actor_cls.pipeline_parallel_size}
    return kwargs, shipped, payload["checkpoints"]


def _engine(kwargs: dict, cpus: list[int], **cpu_substitutes):
    from vllm import LLM

    kwargs = {**kwargs, **cpu_substitutes, "worker_extension_cls": EXTENSION, "enforce_eager": True}
    pp = kwargs.get("pipeline_parallel_size", 1)
    # one OpenMP thread set per pipeline stage
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(str, cpus[:pp])) if pp > 1 else ",".join(map(str, cpus))
    t = time.time()
    llm = LLM(**kwargs)
    start = time.time() - t
    llm.collective_rpc("allocate_pp_receive_buffer")
    config = llm.llm_engine.vllm_config.parallel_config
    parallel = {
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "world_size": config.world_size,
        "backend": config.distributed_executor_backend,
    }
    return llm, parallel, start


def _run(llm, second: str) -> dict:
    """Generate from the weights the engine started with, sync checkpoint `second`, generate."""
    params = _sampling_params()
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    out_first = _summarise(llm.generate(prompts, params, use_tqdm=False))
    sync = llm.collective_rpc("sync_weights_from", args=(second,))
    out_second = _summarise(llm.generate(prompts, params, use_tqdm=False))
    llm.llm_engine.engine_core.shutdown()
    return {"first": out_first, "second": out_second, "sync": sync}


def main(payload_path: str) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, HERE)
    # vLLM's engine-core and worker processes import the worker extension by name
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs 2 CPUs: one OpenMP thread set per pipeline stage")
    cpus = cpus[:2]
    t1 = time.time()
    vllm_kwargs, shipped, (path_a, path_b) = _vllm_kwargs_from_actor(payload_path)
    # engine core in this process: no extra process re-importing vLLM (~10 s) per engine
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cpu = {"distributed_executor_backend": "mp", "dtype": "float32", "max_model_len": 256}
    llm, parallel2, start2 = _engine({**vllm_kwargs, "model": path_a}, cpus, **cpu)
    run2 = _run(llm, path_b)
    del llm
    t2 = time.time()
    pp1_kwargs = {k: v for k, v in vllm_kwargs.items() if k != "pipeline_parallel_size"}
    cpu["distributed_executor_backend"] = "uni"
    llm, parallel1, start1 = _engine({**pp1_kwargs, "model": path_b}, cpus, **cpu)
    run1 = _run(llm, path_a)
    t3 = time.time()
    return {
        "shipped": shipped,
        "vllm_kwargs": {k: v for k, v in vllm_kwargs.items() if isinstance(v, (int, str, float, bool, type(None)))},
        "pp2": {"a": run2["first"], "b": run2["second"], "sync": run2["sync"], "parallel": parallel2},
        "pp1": {"a": run1["second"], "b": run1["first"], "sync": run1["sync"], "parallel": parallel1},
        "timings": {"pp2": t2 - t1, "pp2_start": start2, "pp1": t3 - t2, "pp1_start": start1},
    }


if __name__ == "__main__":
    result = main(sys.argv[1])
    print("RESULT=" + json.dumps(result), flush=True)
