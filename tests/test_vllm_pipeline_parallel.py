"""vLLM pipeline parallelism for the rollout engines (openrlhf_sapo/trainer/ray/vllm_engine.py).

No Ray cluster is started: upstream's real `create_vllm_engines`, the real rollout actor
constructor and upstream's real weight-sync group set-up run with only the calls that need a
cluster or a GPU replaced by recorders (placement groups, `ray.get`, `.options().remote()`, the
vLLM engine start, the NCCL group). `test_real_engine_pipeline_parallel_2_on_cpu` then starts a
real pipeline-parallel vLLM engine on CPU through the same actor class in a subprocess.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from openrlhf_sapo import upstream as sapo_upstream
from openrlhf_sapo.trainer.ray import vllm_engine as pp

HERE = os.path.dirname(os.path.abspath(__file__))
VLLM_ENGINE = "openrlhf.trainer.ray.vllm_engine"
# (num_engines, engine tensor parallel size, pipeline parallel size)
LAYOUTS = [(1, 1, 1), (1, 1, 2), (2, 2, 2), (2, 1, 4), (3, 2, 3)]


@pytest.fixture(scope="module")
def ve():
    sapo_upstream.prepare()
    return importlib.import_module(VLLM_ENGINE)


def _tiny_qwen2(path, seed):
    sys.path.insert(0, HERE)
    try:
        from vllm_pp_tiny_model import build_tiny_qwen2
    finally:
        sys.path.remove(HERE)
    return build_tiny_qwen2(str(path), seed=seed)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two tiny random Qwen2 checkpoints (seeds 0 and 1) with the same architecture."""
    root = tmp_path_factory.mktemp("tiny_qwen2")
    return _tiny_qwen2(root / "a", 0), _tiny_qwen2(root / "b", 1)


@pytest.fixture(autouse=True)
def restore_upstream_state():
    """Each test starts and ends with upstream's rollout actor bound and the environment unchanged."""
    sapo_upstream.prepare()
    module = importlib.import_module(VLLM_ENGINE)
    upstream = pp.upstream_rollout_actor()
    module.RolloutRayActor = upstream
    env = dict(os.environ)
    yield
    module.RolloutRayActor = upstream
    os.environ.clear()
    os.environ.update(env)


def make_args(num_engines, tp, pp_size, **vllm):
    return SimpleNamespace(
        vllm=SimpleNamespace(
            num_engines=num_engines,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp_size,
            sync_backend="nccl",
            sync_with_ray=False,
            gpu_memory_utilization=0.95,
            **vllm,
        )
    )


# ---------------------------------------------------------------------------------------------
# apply_pipeline_parallel


def test_apply_rewrites_gpus_per_engine_records_tp_and_rebinds(ve):
    upstream = ve.RolloutRayActor
    args = make_args(2, 2, 3)
    info = pp.apply_pipeline_parallel(args)
    assert (args.vllm.tensor_parallel_size, args.vllm.engine_tensor_parallel_size) == (6, 2)
    assert args.vllm.pipeline_parallel_size == 3
    assert info["gpus_per_engine"] == 6 and info["engine_tensor_parallel_size"] == 2
    assert info["args_changed"]["vllm.tensor_parallel_size"] == (2, 6)
    assert ve.RolloutRayActor is pp.make_rollout_actor_class(3)
    assert ve.RolloutRayActor is not upstream
    assert ve.RolloutRayActor.__ray_actor_class__.pipeline_parallel_size == 3
    assert issubclass(ve.RolloutRayActor.__ray_actor_class__, upstream.__ray_actor_class__)
    # upstream's class stays reachable (sapo_upstream.upstream and ours)
    assert pp.upstream_rollout_actor() is upstream
    assert sapo_upstream.upstream(VLLM_ENGINE, "RolloutRayActor") is upstream


def test_apply_is_idempotent(ve):
    args = make_args(2, 2, 2)
    pp.apply_pipeline_parallel(args)
    bound = ve.RolloutRayActor
    again = pp.apply_pipeline_parallel(args)
    assert (args.vllm.tensor_parallel_size, args.vllm.engine_tensor_parallel_size) == (4, 2)
    assert again["args_changed"] == {} and again["rebound"] == {}
    assert ve.RolloutRayActor is bound


@pytest.mark.parametrize("pp_size", [1, None])
def test_apply_without_pipeline_parallel_changes_nothing(ve, pp_size):
    upstream = ve.RolloutRayActor
    args = make_args(2, 2, pp_size)
    before = vars(args.vllm).copy()
    info = pp.apply_pipeline_parallel(args)
    assert vars(args.vllm) == before
    assert ve.RolloutRayActor is upstream
    assert info["args_changed"] == {} and info["rebound"] == {}


def test_apply_with_pipeline_parallel_1_after_2_restores_upstream(ve):
    upstream = ve.RolloutRayActor
    pp.apply_pipeline_parallel(make_args(1, 1, 2))
    info = pp.apply_pipeline_parallel(make_args(1, 1, 1))
    assert ve.RolloutRayActor is upstream
    assert info["rebound"] == {f"{VLLM_ENGINE}.RolloutRayActor": "upstream"}


def test_rebound_lists_every_module_global_apply_changes(ve):
    modules = {m for m, _ in pp.REBOUND} | {VLLM_ENGINE, "openrlhf.trainer.ray", "openrlhf.cli.train_ppo_ray"}
    for m in modules:  # import first: importing sets attributes on parent packages
        importlib.import_module(m)
    snapshot = {m: dict(vars(importlib.import_module(m))) for m in modules}
    pp.apply_pipeline_parallel(make_args(2, 1, 2))
    changed = {
        (m, name)
        for m, before in snapshot.items()
        for name, value in vars(importlib.import_module(m)).items()
        if before.get(name, object()) is not value
    }
    assert changed == set(pp.REBOUND)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("pipeline_parallel_size", 0, "pipeline_parallel_size must be an integer >= 1"),
        ("pipeline_parallel_size", -2, "pipeline_parallel_size must be an integer >= 1"),
        ("pipeline_parallel_size", "2", "pipeline_parallel_size must be an integer >= 1"),
        ("pipeline_parallel_size", True, "pipeline_parallel_size must be an integer >= 1"),
        ("tensor_parallel_size", 0, "tensor_parallel_size must be an integer >= 1"),
    ],
)
def test_apply_rejects_bad_sizes(ve, field, value, match):
    upstream = ve.RolloutRayActor
    args = make_args(1, 1, 2)
    setattr(args.vllm, field, value)
    with pytest.raises(ValueError, match=match):
        pp.apply_pipeline_parallel(args)
    assert ve.RolloutRayActor is upstream


def test_apply_rejects_args_changed_after_applying(ve):
    args = make_args(1, 2, 2)
    pp.apply_pipeline_parallel(args)
    args.vllm.pipeline_parallel_size = 4
    with pytest.raises(ValueError, match="engine_tensor_parallel_size=2 .* the arguments changed"):
        pp.apply_pipeline_parallel(args)


def test_engine_kwargs_split_gpus_into_stages(ve):
    cls = pp.make_rollout_actor_class(2).__ray_actor_class__
    assert cls.engine_parallel_kwargs({"tensor_parallel_size": 6, "seed": 1}) == {
        "tensor_parallel_size": 3,
        "pipeline_parallel_size": 2,
        "seed": 1,
    }
    with pytest.raises(ValueError, match="a positive multiple of 2 .* got 3"):
        cls.engine_parallel_kwargs({"tensor_parallel_size": 3})
    with pytest.raises(ValueError, match="got None"):
        cls.engine_parallel_kwargs({})
    with pytest.raises(ValueError, match="sets vLLM's pipeline_parallel_size itself"):
        cls.engine_parallel_kwargs({"tensor_parallel_size": 4, "pipeline_parallel_size": 2})


def test_actor_class_pickles_by_value_with_its_size(ve):
    import ray.cloudpickle as cloudpickle

    remote = pp.make_rollout_actor_class(4)
    shipped = remote.__ray_metadata__.modified_class  # what Ray exports to workers
    data = cloudpickle.dumps(shipped)
    # by value: the class body travels (a by-reference pickle would only name it)
    assert b"engine_parallel_kwargs" in data
    assert cloudpickle.loads(data).pipeline_parallel_size == 4


# ---------------------------------------------------------------------------------------------
# upstream's create_vllm_engines and actor constructor, Ray cluster replaced by recorders


class FakeCluster:
    """Records what upstream asks of Ray; bundle i lives on node i % nodes."""

    def __init__(self, monkeypatch, ve, nodes):
        import ray
        import ray.util

        self.nodes = nodes
        self.placement_groups = []
        self.actors = []
        self.expected_gets = []
        monkeypatch.setattr(ve, "placement_group", self.placement_group)
        monkeypatch.setattr(ray, "get", self.get)
        monkeypatch.setattr(ray.util, "placement_group_table", self.placement_group_table)
        monkeypatch.setattr(ve.RolloutRayActor, "options", self.options)

    def placement_group(self, bundles, strategy="PACK"):
        ready = ("ready", len(self.placement_groups))
        pg = SimpleNamespace(bundles=bundles, strategy=strategy, ready=lambda: ready)
        self.placement_groups.append(pg)
        self.expected_gets.append(ready)
        return pg

    def placement_group_table(self, pg):
        assert pg in self.placement_groups
        return {"bundles_to_node_id": {i: f"node{i % self.nodes}" for i in range(len(pg.bundles))}}

    def get(self, refs, *args, **kwargs):
        if refs in self.expected_gets:
            return None
        if isinstance(refs, list) and all(isinstance(r, SimpleNamespace) and r.kind == "ref" for r in refs):
            return [None for _ in refs]
        raise AssertionError(f"unexpected ray.get({refs!r})")

    def options(self, **options):
        return SimpleNamespace(remote=lambda *args, **kwargs: self._create(options, args, kwargs))

    def _create(self, options, args, kwargs):
        assert not args, "upstream passes the actor's arguments by keyword"
        self.actors.append((options, kwargs))
        return SimpleNamespace(kind="actor", index=len(self.actors) - 1)


def create_engines(ve, num_engines, gpus_per_engine, shared_pg=None):
    """Upstream's create_vllm_engines with the values train() passes (model path, no sleep)."""
    return ve.create_vllm_engines(
        num_engines,
        gpus_per_engine,
        "/models/tiny",
        42,
        False,  # full_determinism
        False,  # enable_prefix_caching
        True,  # enforce_eager
        256,  # max_len
        shared_pg,
        0.95,  # gpu_memory_utilization
        False,  # vllm_enable_sleep
        None,  # logprobs_mode
    )


class EngineStart:
    """Stands in for the vLLM engine start inside upstream's actor constructor."""

    def __init__(self, monkeypatch):
        import vllm

        self.engine_args = []
        real = vllm.AsyncEngineArgs

        def record_engine_args(*args, **kwargs):
            engine_args = real(*args, **kwargs)  # vLLM's own argument class accepts them
            self.engine_args.append((kwargs, engine_args))
            return engine_args

        class _Engine:
            async def is_sleeping(self):
                return False

        monkeypatch.setattr(vllm, "AsyncEngineArgs", record_engine_args)
        monkeypatch.setattr(vllm.AsyncLLMEngine, "from_engine_args", staticmethod(lambda engine_args: _Engine()))


def construct_actor(ve, kwargs):
    """Run the rollout actor's constructor the way a Ray worker would (the class Ray ships)."""
    cls = ve.RolloutRayActor.__ray_metadata__.modified_class
    actor = cls.__new__(cls)
    asyncio.run(cls.__init__(actor, **kwargs))
    return actor


def expected_bundles(total, nodes, engine, per_engine):
    grouped = [b for n in range(nodes) for b in range(total) if b % nodes == n]
    return grouped[engine * per_engine : (engine + 1) * per_engine]


@pytest.mark.parametrize("num_engines, tp, pp_size", LAYOUTS)
def test_create_vllm_engines_places_and_configures_pipeline_stages(
    ve, monkeypatch, tiny_models, num_engines, tp, pp_size
):
    from vllm.config import ParallelConfig

    args = make_args(num_engines, tp, pp_size)
    pp.apply_pipeline_parallel(args)
    gpus = tp * pp_size
    # two nodes where each holds whole engines, so upstream's node grouping is visible
    nodes = 2 if num_engines % 2 == 0 and gpus > 1 else 1
    cluster = FakeCluster(monkeypatch, ve, nodes)
    engines = create_engines(ve, args.vllm.num_engines, args.vllm.tensor_parallel_size)

    assert len(engines) == num_engines == len(cluster.actors)
    (pg,) = cluster.placement_groups
    assert pg.bundles == [{"GPU": 1, "CPU": 1}] * (num_engines * tp * pp_size)
    assert pg.strategy == "PACK"

    monkeypatch.setenv("RAY_ADDRESS", "unused:0")  # upstream asks Ray's worker for it only when unset
    start = EngineStart(monkeypatch)
    taken = []
    for i, (options, kwargs) in enumerate(cluster.actors):
        bundles = kwargs["bundle_indices"]
        if gpus == 1:
            assert bundles is None and options["scheduling_strategy"].placement_group_bundle_index == i
            assert options["num_gpus"] == 1
        else:
            assert bundles == expected_bundles(num_engines * gpus, nodes, i, gpus)
            assert len({f"node{b % nodes}" for b in bundles}) == 1  # an engine's stages on one node here
            assert options["scheduling_strategy"].placement_group_bundle_index == bundles[0]
            assert options["num_gpus"] == 0  # the engine's vLLM workers hold the GPUs
            taken += bundles
        assert options["scheduling_strategy"].placement_group is pg

        construct_actor(ve, dict(kwargs))
        vllm_kwargs, engine_args = start.engine_args[-1]
        assert engine_args.tensor_parallel_size == vllm_kwargs["tensor_parallel_size"] == tp
        assert vllm_kwargs.get("pipeline_parallel_size", 1) == engine_args.pipeline_parallel_size == pp_size
        assert engine_args.distributed_executor_backend == ("uni" if gpus == 1 else "ray")
        assert engine_args.seed == 42 + i
        world = ParallelConfig(
            tensor_parallel_size=tp, pipeline_parallel_size=pp_size, distributed_executor_backend="ray"
        ).world_size
        assert world == gpus
        if gpus > 1:
            # what vLLM's Ray executors assert: one bundle per worker of the engine
            assert os.environ["VLLM_RAY_BUNDLE_INDICES"] == ",".join(map(str, bundles))
            assert os.environ["VLLM_RAY_PER_WORKER_GPUS"] == "1"
    assert sorted(taken) == ([] if gpus == 1 else list(range(num_engines * gpus)))

    # vLLM accepts the engine configuration for a real (tiny Qwen2) model: PP support, sizes, backend
    vllm_kwargs, _ = start.engine_args[-1]
    config = type(start.engine_args[-1][1])(**{**vllm_kwargs, "model": tiny_models[0]}).create_engine_config()
    parallel = config.parallel_config
    assert (parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.world_size) == (tp, pp_size, gpus)


def test_hybrid_engine_takes_whole_engines_from_the_actor_placement_group(ve, monkeypatch):
    """colocate_all: upstream passes the actor's placement group (one bundle per actor GPU)."""
    args = make_args(2, 2, 2)
    pp.apply_pipeline_parallel(args)
    cluster = FakeCluster(monkeypatch, ve, nodes=1)
    actor_pg = cluster.placement_group([{"GPU": 1, "CPU": 1}] * 8)
    create_engines(ve, 2, args.vllm.tensor_parallel_size, shared_pg=actor_pg)
    assert cluster.placement_groups == [actor_pg]  # no placement group of its own
    assert [kwargs["bundle_indices"] for _, kwargs in cluster.actors] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(kwargs["num_gpus"] == 0.2 for _, kwargs in cluster.actors)


# ---------------------------------------------------------------------------------------------
# upstream's weight-sync group with the rewritten arguments


@pytest.mark.parametrize("num_engines, tp, pp_size", LAYOUTS)
def test_weight_sync_group_gives_every_stage_worker_its_own_rank(ve, monkeypatch, num_engines, tp, pp_size):
    import ray
    import torch
    from vllm.config import ParallelConfig

    ppo_actor = importlib.import_module("openrlhf.trainer.ray.ppo_actor")
    trainer_cls = sapo_upstream.upstream("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer")
    args = make_args(num_engines, tp, pp_size)
    pp.apply_pipeline_parallel(args)

    calls, groups = [], []

    class Engine:
        def __init__(self):
            self.init_process_group = SimpleNamespace(remote=self._init)

        def _init(self, *a, **kw):
            calls.append((self, a, kw))
            return SimpleNamespace(kind="ref")

    def fake_group(address, port, rank, world_size, device):
        groups.append((rank, world_size))
        return "group"

    FakeCluster(monkeypatch, ve, nodes=1)  # ray.get
    monkeypatch.setattr(ray._private.services, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(ppo_actor, "stateless_init_process_group", fake_group)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    engines = [Engine() for _ in range(num_engines)]
    trainer = SimpleNamespace(strategy=SimpleNamespace(args=args), vllm_engines=engines)
    trainer_cls._init_vllm_sync_group(trainer, "nccl")

    world = num_engines * tp * pp_size + 1
    assert groups == [(0, world)]  # the DeepSpeed side: rank 0 of the whole group
    assert [c[0] for c in calls] == engines
    engine_world = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp_size).world_size
    ranks = []
    for _, (address, port, rank_offset, world_size, group_name), kw in calls:
        assert world_size == world and group_name == "openrlhf"
        # WorkerWrap.init_process_group: rank = vLLM worker's global rank (0..TP*PP-1) + rank_offset
        ranks += [rank_offset + r for r in range(engine_world)]
    assert sorted(ranks) == list(range(1, world))


# ---------------------------------------------------------------------------------------------
# a real pipeline-parallel vLLM engine on CPU


def _run_engine_check(payload_path: str, timeout: float) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_WAIT_POLICY="PASSIVE")
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "vllm_pp_engine_check.py"), payload_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: vLLM's workers go with it on a timeout
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the vLLM pipeline-parallel check took over {timeout} s; its output ends:\n{output[-6000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftover engine processes, if any
        except ProcessLookupError:
            pass
    lines = [line for line in output.splitlines() if line.startswith("RESULT=")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}; output ends:\n{output[-6000:]}"
    return json.loads(lines[-1][len("RESULT=") :])


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU per pipeline stage")
def test_real_engine_pipeline_parallel_2_on_cpu(ve, monkeypatch, tmp_path, tiny_models):
    import ray.cloudpickle as cloudpickle

    # What Ray would ship for one engine with TP=1, PP=2: the class and upstream's kwargs for it.
    args = make_args(1, 1, 2)
    pp.apply_pipeline_parallel(args)
    cluster = FakeCluster(monkeypatch, ve, nodes=1)
    create_engines(ve, 1, args.vllm.tensor_parallel_size)
    ((_, kwargs),) = cluster.actors
    payload = tmp_path / "actor.pkl"
    payload.write_bytes(
        cloudpickle.dumps(
            {
                "actor_class": ve.RolloutRayActor.__ray_metadata__.modified_class,
                "kwargs": kwargs,
                "checkpoints": tiny_models,
            }
        )
    )
    t = time.time()
    result = _run_engine_check(str(payload), timeout=240)
    elapsed = time.time() - t
    pp2, pp1 = result["pp2"], result["pp1"]

    # the shipped class ran in a process where openrlhf_sapo could not be imported, and the kwargs
    # upstream's constructor gave vLLM started a 2-stage engine
    assert result["shipped"]["pipeline_parallel_size"] == 2
    assert result["vllm_kwargs"]["tensor_parallel_size"] == 1
    assert result["vllm_kwargs"]["pipeline_parallel_size"] == 2
    assert result["vllm_kwargs"]["distributed_executor_backend"] == "ray"  # replaced by "mp" on CPU
    assert pp2["parallel"] == {"tensor_parallel_size": 1, "pipeline_parallel_size": 2, "world_size": 2, "backend": "mp"}
    assert pp1["parallel"]["pipeline_parallel_size"] == 1

    # same weights, same greedy tokens and log-probs with 2 stages as with 1
    for weights in ("a", "b"):
        assert pp2[weights]["tokens"] == pp1[weights]["tokens"], weights
        for row2, row1 in zip(pp2[weights]["logprobs"], pp1[weights]["logprobs"]):
            assert row2 == pytest.approx(row1, abs=1e-4), weights
    # the weight sync changed the model (checkpoints A and B generate differently)
    assert pp2["a"]["tokens"] != pp2["b"]["tokens"]

    # each stage loaded exactly what it owns; together, everything the PP=1 engine owns
    stages = sorted(pp2["sync"], key=lambda s: s["pp_rank"])
    assert [(s["pp_rank"], s["rank"], s["world_size"]) for s in stages] == [(0, 0, 2), (1, 1, 2)]
    for stage in stages + pp1["sync"]:
        assert set(stage["loaded"]) == set(stage["owned"])
    first, last = (set(s["loaded"]) for s in stages)
    assert not first & last
    assert first | last == set(pp1["sync"][0]["loaded"])
    assert "model.embed_tokens.weight" in first and "lm_head.weight" in last and "model.norm.weight" in last
    assert {n.split(".")[2] for n in first if n.startswith("model.layers.")} == {"0", "1"}
    assert {n.split(".")[2] for n in last if n.startswith("model.layers.")} == {"2", "3"}
    print(f"vLLM PP check: {elapsed:.1f} s, timings {result['timings']}")
