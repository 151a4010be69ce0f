"""The time-bounded verifier: helper processes that run math-verify with a deadline per answer.

Why processes. math-verify bounds its own work with ``signal.alarm``, which only works in the main thread
(from another thread ``parse``/``verify`` raise ValueError), and OpenRLHF calls reward functions through
``asyncio.to_thread``; a computation stuck in C code (``9^{9^{9^{9}}}``, ``(10^{6})!``) cannot be
interrupted at all, only killed. So anything that reaches sympy runs in a helper process.

How. ``VerifierPool`` has ``workers`` slots and hands each to one calling thread at a time. A slot is a
``concurrent.futures.ProcessPoolExecutor`` with one process, started with "spawn" (a fresh interpreter:
no copy of the caller's threads, locks or CUDA state) and an initializer that starts a new session (a
Ctrl-C to the trainer does not reach it), caps its address space (``RLIMIT_AS``, 4 GiB by default, so a
runaway allocation fails inside it instead of exhausting the machine), makes it exit when its parent is
gone, installs the soft timeout and imports and warms math-verify. A batch goes to the process as tasks
of up to ``_CHUNK_ITEMS`` answers (one round trip for many answers); a task stops after the answer that
takes it past ``_SLICE_S`` and the rest go in the next one, so little finished work is lost when a
process is killed.

Time bound. Inside the process a SIGALRM at ``_SOFT_TIMEOUT_FRACTION`` of the timeout interrupts
Python-level sympy work ("timeout", the process lives on). The process also writes, in one shared 64-bit
word, which answer of the task it is on and since when; the caller waits on the task's future only until
that answer's deadline (``timeout_s`` after it started, from any thread). Past it, the process is killed
(hard timeout: that answer scores "timeout after ...s"), the executor replaced at once without waiting
for the new process's imports, and the answers not finished are sent to the new one. A process that
dies (``BrokenProcessPool``) is replaced the same way, and the answer it was on retried once.
``grade`` never raises for a failed process: such answers get a reason ("verifier unavailable: ...",
"verifier error: ..."). Helper processes are killed when the pool is closed and at exit: before
``concurrent.futures`` joins its executors (``_at_interpreter_exit``; a helper serving a non-daemon thread
is left to that thread, which exit joins and whose call ends by its deadline), the rest by ``atexit``.
A helper also exits by itself within a second when its parent is gone. Once the interpreter exits (the
main thread has returned), ``concurrent.futures`` accepts no new task, so a thread still grading then
gets "verifier unavailable" for the answers not yet sent (those in flight finish or time out).

What a helper imports. "spawn" normally runs the caller's ``__main__`` again in the child (a training
script or Ray's worker: seconds of imports and GBs of address space in every helper, and an error for a
script without an ``if __name__ == "__main__"`` guard); ``_skip_main_flag`` turns that off for the helpers
started here, so a helper imports only this package and math-verify. It imports this package under the
name the caller uses: the executor's initializer is the builtin ``exec`` running ``_HELPER_BOOTSTRAP``
(which any process can unpickle), which first registers the package by its folder when the caller loaded
it by path (``math_reward.py`` loaded from a copy outside the importable package).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import List, Optional, Sequence, Tuple

from .equivalence import grade_in_process

__all__ = ["VerifierPool"]

_SOFT_TIMEOUT_FRACTION = 0.8  # helper-side SIGALRM, before the caller's hard kill at 100%
_STARTUP_TIMEOUT_S = 120.0  # start + import of sympy/math-verify in a fresh helper (not counted in timeout_s)
_CHUNK_ITEMS = 256  # answers per task at most
_SLICE_S = 0.05  # a task returns after the answer that takes it past this many seconds
_INDEX_SHIFT = 44  # progress word: (answer index + 1) << 44 | microseconds since the task's base time

Result = Tuple[bool, str, float]  # (correct, reason, seconds spent in the helper)


# --------------------------------------------------------------------------- helper side

_HELPER_BOOTSTRAP = """
import importlib, sys, types
if package_dir is not None and package not in sys.modules:
    module = types.ModuleType(package)
    module.__path__ = [package_dir]
    sys.modules[package] = module
importlib.import_module(package + ".verifier_pool")._init_helper(memory_mb, progress)
"""

_HELPER = {"memory_mb": 0, "progress": None, "error": None}  # the helper process's state


class _SoftTimeout(BaseException):
    """Raised by SIGALRM in the helper; a BaseException so math-verify's `except Exception` lets it through."""


def _raise_soft_timeout(signum, frame):
    raise _SoftTimeout()


def _init_helper(memory_mb: int, progress) -> None:  # pragma: no cover - runs in the helper process
    """The executor's initializer (through ``_HELPER_BOOTSTRAP``); a failure is reported by ``_ready``."""
    _HELPER.update(memory_mb=memory_mb, progress=progress)
    try:
        try:
            os.setsid()  # a Ctrl-C to the trainer's process group does not kill it mid-call
        except OSError:
            pass
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        if memory_mb > 0:
            import resource

            cap = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

        def _watch_parent(parent: int = os.getppid()) -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(0)

        threading.Thread(target=_watch_parent, daemon=True).start()
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        grade_in_process("x+1", "1+x", "expression", None)  # import + warm the LaTeX parser
        signal.signal(signal.SIGALRM, _raise_soft_timeout)
    except Exception as e:
        detail = f" (worker address space capped at {memory_mb} MB)" if isinstance(e, MemoryError) else ""
        _HELPER["error"] = (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)[:300] + detail


def _ready() -> Tuple[Optional[int], Optional[str]]:  # pragma: no cover - runs in the helper process
    return os.getpid(), _HELPER["error"]


def _grade_slice(items, soft_timeout: float, slice_s: float, base: float) -> List[Result]:  # pragma: no cover
    """Grade ``items`` in order until one takes the task past ``slice_s``; the results so far."""
    if _HELPER["error"]:
        raise RuntimeError(_HELPER["error"])
    progress = _HELPER["progress"]
    results: List[Result] = []
    task_started = time.monotonic()
    for i, (answer, label, answer_type) in enumerate(items):
        started = time.monotonic()
        if i and started - task_started >= slice_s:
            break
        progress.value = ((i + 1) << _INDEX_SHIFT) | max(0, int((started - base) * 1e6))
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, soft_timeout)
                ok, reason = grade_in_process(answer, label, answer_type, None)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            ok, reason = False, "timeout"
        except MemoryError:
            cap = _HELPER["memory_mb"]
            ok, reason = False, f"verifier error: MemoryError (worker address space capped at {cap} MB)"
        except Exception as e:  # noqa: BLE001
            ok, reason = False, f"verifier error: {type(e).__name__}: {e}"[:300]
        results.append((bool(ok), reason, time.monotonic() - started))
    return results


# --------------------------------------------------------------------------- caller side


class _WorkerDied(RuntimeError):
    pass


_LIVE = set()  # every slot with a helper process started by this process, killed at exit
_LIVE_LOCK = threading.Lock()
_HOOK_LOCK = threading.Lock()


_EXITING = False  # set at interpreter exit: no helper starts any more


def _kill_all_helpers(keep_non_daemon_callers: bool = False) -> None:
    with _LIVE_LOCK:
        slots = [s for s in _LIVE if s.owner == os.getpid()]  # a forked copy leaves its parent's alone
    for slot in slots:
        caller = slot.caller
        if not (keep_non_daemon_callers and caller is not None and not caller.daemon and caller.is_alive()):
            slot.kill()


def _at_interpreter_exit() -> None:
    """Runs before ``concurrent.futures`` joins its executors at exit, which would wait for a busy helper:
    kills the helpers but those serving a non-daemon thread (exit joins that thread; its call ends by its
    own deadline). ``atexit`` kills the rest afterwards."""
    global _EXITING
    _EXITING = True
    _kill_all_helpers(keep_non_daemon_callers=True)


def _skip_main_flag() -> threading.local:
    """A per-thread flag: while set, a process this thread starts with "spawn" does not run the caller's
    ``__main__`` again. ``multiprocessing.spawn.get_preparation_data`` is wrapped once (by whichever copy of
    this module comes first) to drop its ``init_main_from_*`` entries while the flag is set; for other
    threads and callers it returns what it always did."""
    import multiprocessing.spawn as mp_spawn

    with _HOOK_LOCK:
        current = mp_spawn.get_preparation_data
        flag = getattr(current, "_sapo_skip_main", None)
        if flag is None:
            flag = threading.local()

            def get_preparation_data(name, _inner=current, _flag=flag):
                data = _inner(name)
                if getattr(_flag, "on", False):
                    data.pop("init_main_from_name", None)
                    data.pop("init_main_from_path", None)
                return data

            get_preparation_data._sapo_skip_main = flag
            mp_spawn.get_preparation_data = get_preparation_data
        return flag


def _package_dir() -> Optional[str]:
    """This package's folder when it is not importable by name (registered by path), else None."""
    package = sys.modules.get(__package__)
    return None if getattr(package, "__file__", None) else os.path.dirname(os.path.abspath(__file__))


class _Slot:
    """One helper process (a one-process executor); used by one thread at a time (the pool hands it out)."""

    def __init__(self, memory_mb: int):
        self.memory_mb = memory_mb
        self.owner = os.getpid()
        self.executor: Optional[ProcessPoolExecutor] = None
        self.processes: list = []  # the executor's multiprocessing.Process (one)
        self.ready = None  # future of the first task: (pid, initializer error)
        self.progress = None  # shared word: which answer of the current task runs, since when
        self.pid: Optional[int] = None  # set once the helper is ready
        self.restarts = 0
        self.caller: Optional[threading.Thread] = None  # the thread using the slot now

    def start(self) -> None:
        """Launch without waiting for the helper to be ready."""
        if _EXITING:
            raise _WorkerDied("the interpreter is exiting")
        ctx = multiprocessing.get_context("spawn")
        self.pid = None
        flag = _skip_main_flag()
        flag.on = True
        try:
            self.progress = ctx.RawValue("q", 0)
            bootstrap = {"package": __package__, "package_dir": _package_dir(), "memory_mb": int(self.memory_mb),
                         "progress": self.progress}
            self.executor = ProcessPoolExecutor(
                1, mp_context=ctx, initializer=exec, initargs=(_HELPER_BOOTSTRAP, bootstrap)
            )
            with _LIVE_LOCK:
                _LIVE.add(self)
            self.ready = self.executor.submit(_ready)  # spawns the process now, in this thread
        except Exception as e:
            self.kill()
            raise _WorkerDied(f"worker failed to start ({type(e).__name__}: {e})") from None
        finally:
            flag.on = False
        self.processes = list((getattr(self.executor, "_processes", None) or {}).values())

    def alive(self) -> bool:
        return self.executor is not None and all(p.is_alive() for p in self.processes)

    def exit_code(self) -> Optional[int]:
        for p in self.processes:
            p.join(1.0)
            return p.exitcode
        return None

    def kill(self) -> None:
        executor, processes = self.executor, self.processes
        self.executor, self.processes, self.ready, self.pid = None, [], None, None
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if executor is None or self.owner != os.getpid():
            return
        for p in processes:  # first: shutting down an executor waits for a busy process
            try:
                p.kill()
                p.join(5)
            except Exception:  # pragma: no cover - already gone
                pass
        try:
            executor.shutdown(wait=False, cancel_futures=True)
        except Exception:  # pragma: no cover
            pass

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        try:
            self.start()
        except _WorkerDied:
            pass  # reported by the next ensure_ready

    def ensure_ready(self) -> None:
        if self.executor is not None and not self.alive():  # died while idle
            self.kill()
            self.restarts += 1
        if self.executor is None:
            self.start()
        if self.pid is None:
            try:
                pid, error = self.ready.result(timeout=_STARTUP_TIMEOUT_S)
            except Exception as e:
                if isinstance(e, FutureTimeout):
                    e = TimeoutError(f"not ready after {_STARTUP_TIMEOUT_S:.0f}s")
                self.kill()
                raise _WorkerDied(f"worker failed to start ({type(e).__name__}: {e})") from None
            if error:
                self.kill()
                raise _WorkerDied(f"worker failed to start: {error}")
            self.pid = pid

    def _submit(self, items, soft_timeout: float):
        for attempt in range(2):  # a helper that died while idle is replaced once
            self.ensure_ready()
            self.progress.value = 0
            base = time.monotonic()
            try:
                return self.executor.submit(_grade_slice, items, soft_timeout, _SLICE_S, base), base
            except Exception as e:
                self.kill()
                self.restarts += 1
                if attempt:
                    raise _WorkerDied(f"could not send to worker ({type(e).__name__}: {e})") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _current(self, base: float) -> Tuple[int, float]:
        """(index of the answer the helper is on in the current task, or -1; when it started)."""
        word = self.progress.value
        if not word:
            return -1, base
        return (word >> _INDEX_SHIFT) - 1, base + (word & ((1 << _INDEX_SHIFT) - 1)) / 1e6

    def _wait(self, future, base: float, timeout_s: float) -> Optional[Tuple[int, float]]:
        """Wait for the task; None when it is done, else (index, started) of the answer past its deadline."""
        while True:
            index, started = self._current(base)
            remaining = started + timeout_s - time.monotonic()
            if remaining <= 0 and not future.done():
                return max(index, 0), started
            try:
                future.exception(timeout=max(remaining, 0.0))  # waits; the task's own error is read later
                return None
            except FutureTimeout:
                pass  # the helper may have moved on to the next answer: look again

    def grade(self, jobs: Sequence[Tuple[str, str, str]], timeout_s: float) -> List[Result]:
        """Grade normalized jobs; each result is (correct, reason, seconds spent in the helper)."""
        results: List[Optional[Result]] = [None] * len(jobs)
        todo = list(range(len(jobs)))  # jobs without a result, in order
        timeout_reason = f"timeout after {float(timeout_s)}s"
        soft = timeout_s * _SOFT_TIMEOUT_FRACTION
        retried = None  # a job whose helper died is retried once (the helper may have died before it)
        try:
            while todo:
                batch = todo[:_CHUNK_ITEMS]
                try:
                    future, base = self._submit([jobs[j] for j in batch], soft)
                except _WorkerDied as e:
                    for j in todo:
                        results[j] = (False, f"verifier unavailable: {e}", 0.0)
                    break
                stuck = self._wait(future, base, timeout_s)
                if stuck is not None:  # hard timeout: kill, and resend what was not finished
                    index, started = stuck
                    results[batch[index]] = (False, timeout_reason, time.monotonic() - started)
                    todo = batch[:index] + todo[index + 1 :]
                    self.restart()
                    continue
                try:
                    done = future.result()
                except Exception as e:  # the helper died (BrokenProcessPool) or the task failed
                    index = max(self._current(base)[0], 0)  # -1: it died before starting on the task
                    if retried == batch[index]:
                        code = self.exit_code()
                        results[batch[index]] = (False, f"verifier error: worker died (exit code {code}; {e})", 0.0)
                        todo = batch[:index] + todo[index + 1 :]
                    else:
                        retried = batch[index]
                    self.restart()
                    continue
                for j, (ok, reason, seconds) in zip(batch, done):
                    results[j] = (bool(ok), timeout_reason if reason == "timeout" else reason, float(seconds))
                todo = todo[len(done) :]
        except BaseException:  # e.g. KeyboardInterrupt while waiting: the helper's state is unknown
            self.kill()
            raise
        return results  # type: ignore[return-value]


class VerifierPool:
    """Helper processes running math-verify, handed out to one calling thread at a time."""

    def __init__(self, workers: int = 2, memory_mb: int = 4096):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.size = workers
        self.memory_mb = memory_mb
        self._pid = os.getpid()
        self._all = [_Slot(memory_mb) for _ in range(workers)]
        self._idle: "queue.LifoQueue[_Slot]" = queue.LifoQueue()
        for slot in self._all:
            self._idle.put(slot)

    def _take_idle(self) -> List[_Slot]:
        taken = []
        while True:
            try:
                taken.append(self._idle.get_nowait())
            except queue.Empty:
                return taken

    def prestart(self) -> None:
        """Launch every idle helper now (non-blocking) so the first call does not wait for the imports."""
        taken = self._take_idle()
        try:
            for slot in taken:
                if not slot.alive():
                    slot.kill()
                    try:
                        slot.start()
                    except _WorkerDied:
                        pass  # reported by check() or the next call
        finally:
            for slot in taken:
                self._idle.put(slot)

    def check(self) -> None:
        """Wait until a helper is ready; raises RuntimeError if it cannot start."""
        slot = self._idle.get()
        slot.caller = threading.current_thread()
        try:
            slot.ensure_ready()
        except _WorkerDied as e:
            raise RuntimeError(f"the math-verify helper process could not start: {e}") from None
        finally:
            slot.caller = None
            self._idle.put(slot)

    def grade(self, jobs: Sequence[Tuple[str, str, str]], timeout_s: float) -> List[Result]:
        if not jobs:
            return []
        slot = self._idle.get()
        slot.caller = threading.current_thread()
        try:
            return slot.grade(jobs, timeout_s)
        finally:
            slot.caller = None
            self._idle.put(slot)

    @property
    def restarts(self) -> int:
        return sum(s.restarts for s in self._all)

    def pids(self) -> List[int]:
        return [p.pid for s in self._all if s.alive() for p in s.processes]

    def close(self) -> None:
        if os.getpid() != self._pid:  # a forked copy must not kill its parent's helpers
            return
        for slot in self._all:
            slot.kill()


atexit.register(_kill_all_helpers)
try:  # CPython >= 3.9; these run last-registered first, so before concurrent.futures' own exit hook
    threading._register_atexit(_at_interpreter_exit)
except (AttributeError, RuntimeError):  # pragma: no cover - another Python, or imported during exit
    pass
