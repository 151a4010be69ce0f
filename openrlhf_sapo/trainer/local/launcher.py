"""In-process stand-ins for what Ray provides upstream (the counterpart of openrlhf/trainer/ray/launcher.py).

The single-process backend runs upstream's own trainer, experience maker, samples generator and
model workers unchanged; they talk to each other through Ray object refs and actor handles. Here:

- `LocalObjectStore` offers the three calls upstream makes on the `ray` module in those files
  (`get`, `put`, `wait`; `upstream.local_ray` installs it there for the length of a run).
  A call on a local handle runs at once, except a coroutine method (the rollout engine's
  `generate_responses`): its ref stays pending until a `get`/`wait` needs any pending ref, and then
  ALL pending coroutines run together in one event loop, which is what lets the engine batch every
  prompt of a rollout into one `generate` call, as vLLM batches concurrent requests.
- `LocalHandle` makes an object look like a Ray actor handle (`handle.method.remote(...)`).
- `LocalActorGroup` is a `RayActorGroup` of one in-process worker (world size 1): the same
  methods, dispatching through the worker's own `execute_batch` as upstream does.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable, List, Optional, Sequence, Tuple

_PENDING = object()


class LocalRef:
    """A ready value, or a coroutine factory the store runs on demand."""

    __slots__ = ("_value", "_start")

    def __init__(self, value: Any = _PENDING, start: Optional[Callable] = None):
        self._value = value
        self._start = start

    @property
    def ready(self) -> bool:
        return self._value is not _PENDING

    def __repr__(self) -> str:
        return f"LocalRef({'ready' if self.ready else 'pending'})"


class LocalObjectStore:
    """`ray.get` / `ray.put` / `ray.wait` for refs made in this process."""

    def __init__(self):
        self._pending: List[LocalRef] = []

    # -- making refs
    def put(self, value: Any) -> LocalRef:
        return LocalRef(value)

    def call(self, method: Callable, *args, **kwargs) -> LocalRef:
        if inspect.iscoroutinefunction(method):
            ref = LocalRef(start=lambda: method(*args, **kwargs))
            self._pending.append(ref)
            return ref
        return LocalRef(method(*args, **kwargs))

    # -- resolving refs
    def _run_pending(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return

        async def run_all():
            return await asyncio.gather(*(ref._start() for ref in pending))

        for ref, value in zip(pending, asyncio.run(run_all())):
            ref._value, ref._start = value, None

    def get(self, refs, timeout: Optional[float] = None):
        if isinstance(refs, (list, tuple)):
            if any(isinstance(r, LocalRef) and not r.ready for r in refs):
                self._run_pending()
            return [self.get(r) for r in refs]
        if not isinstance(refs, LocalRef):
            raise TypeError(f"get() expects a LocalRef or a list of them, got {type(refs).__name__}")
        if not refs.ready:
            self._run_pending()
        return refs._value

    def wait(self, refs: Sequence[LocalRef], num_returns: int = 1, timeout: Optional[float] = None,
             **kwargs) -> Tuple[list, list]:
        refs = list(refs)
        if any(not r.ready for r in refs):
            self._run_pending()
        return refs[:num_returns], refs[num_returns:]


class _RemoteMethod:
    def __init__(self, store: LocalObjectStore, method: Callable):
        self._store, self._method = store, method

    def remote(self, *args, **kwargs) -> LocalRef:
        return self._store.call(self._method, *args, **kwargs)


class LocalHandle:
    """`handle.method.remote(*args)` on an object in this process."""

    def __init__(self, target: Any, store: LocalObjectStore):
        self._target, self._store = target, store

    @property
    def target(self) -> Any:
        return self._target

    def __getattr__(self, name: str) -> _RemoteMethod:
        return _RemoteMethod(self._store, getattr(self._target, name))


class LocalActorGroup:
    """upstream's RayActorGroup with one worker in this process (the same method names and results)."""

    def __init__(self, worker: Any, store: LocalObjectStore, duplicate_actors: int = 1):
        if duplicate_actors != 1:
            raise ValueError(
                "the single-process backend runs world size 1: ring attention and DeepSpeed tensor "
                "parallelism need several processes (use --ds.ring_attn_size 1 --ds.tensor_parallel_size 1)"
            )
        self.worker = worker
        self.duplicate_actors = duplicate_actors
        self._store = store
        self._handle = LocalHandle(worker, store)

    def async_init_model_from_pretrained(self, *args, **kwargs) -> List[LocalRef]:
        return [self._handle.init_model_from_pretrained.remote(*args, **kwargs)]

    def async_save_model(self) -> List[LocalRef]:
        return [self._handle.save_model.remote()]

    def async_run_method(self, method_name: str, *args, **kwargs) -> List[LocalRef]:
        return [getattr(self._handle, method_name).remote(*args, **kwargs)]

    def async_run_method_batch(self, method_name: str, **kwargs) -> List[LocalRef]:
        lengths = {key: len(value) for key, value in kwargs.items()}
        if not lengths or len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ValueError(f"async_run_method_batch needs non-empty lists of one length, got {lengths}")
        n = next(iter(lengths.values()))
        return [self._handle.execute_batch.remote(method_name, kwargs, 0, n)]
