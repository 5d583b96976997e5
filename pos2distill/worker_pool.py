"""Spawned worker processes for data-parallel generation, one per GPU group.

Each worker owns one engine (a vLLM ``LLM`` or a Hugging Face ``HFBackend``) built in the
worker by ``build(*build_args[rank])``, and answers the parent's requests with
``serve(engine, payload)``. The parent sends every worker its shard of a call and collects
the answers in rank order.

Workers are spawned, not forked: CUDA cannot be used in a forked child. Each one sets
``CUDA_VISIBLE_DEVICES`` to its devices before building anything, so it sees its GPUs only.
Being spawned, they re-import the caller's main module: scripts need an
``if __name__ == "__main__":`` guard. ``build`` and ``serve`` must be module-level functions
(they are pickled by name). Workers are not daemonic: vLLM engines start processes of their own.
"""

from __future__ import annotations

import atexit
import os
import traceback
import weakref

from .errors import UserError


def _worker_main(conn, devices: str, build, build_args: tuple, serve) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = devices  # before anything imports torch
    try:
        engine = build(*build_args)
        conn.send(("ready", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        conn.close()
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent went away
            break
        if message[0] == "close":
            break
        try:
            conn.send(("ok", serve(engine, message[1])))
        except UserError as err:  # the user's to fix (e.g. a smaller --batch_size): one line, not a traceback
            conn.send(("user_error", str(err)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    conn.close()


def _stop(workers: list) -> None:
    for _, conn in workers:
        try:
            conn.send(("close",))
        except (OSError, ValueError):
            pass
    for process, conn in workers:
        process.join(timeout=60)
        if process.is_alive():
            process.terminate()
            process.join(timeout=10)
        conn.close()
    workers.clear()


class WorkerPool:
    """``len(devices)`` workers; worker ``rank`` sees ``devices[rank]`` (a CUDA_VISIBLE_DEVICES value).

    ``name`` names the engine in errors ("vLLM worker 1 failed while generating: ...").
    ``timeout_s``: a worker silent for that long is an error (default: wait as long as it lives).
    Start-up waits until every worker has built its engine; a failure there stops them all.
    A ``UserError`` raised in a worker is raised again in the parent (its one-line message);
    any other failure becomes a ``RuntimeError`` carrying the worker's traceback.
    """

    def __init__(self, build, serve, devices: list[str], build_args: list[tuple], *, name: str,
                 timeout_s: float | None = None):
        import multiprocessing

        if len(build_args) != len(devices):
            raise ValueError(f"{len(build_args)} build_args for {len(devices)} workers")
        self.name = name
        self.devices = list(devices)
        self.timeout_s = timeout_s
        self._workers: list = []
        # Stop worker processes even if the owner forgets close().
        self._finalizer = weakref.finalize(self, _stop, self._workers)
        context = multiprocessing.get_context("spawn")
        for rank, (devices_of_rank, args) in enumerate(zip(self.devices, build_args)):
            parent_conn, child_conn = context.Pipe()
            process = context.Process(target=_worker_main, args=(child_conn, devices_of_rank, build, args, serve),
                                      name=f"{name}-dp{rank}", daemon=False)
            process.start()
            child_conn.close()
            self._workers.append((process, parent_conn))
        # At exit, stop them before multiprocessing's own exit handler waits for them (they are not
        # daemons, so it would wait forever): atexit runs handlers last-in first-out, and that
        # handler was registered when the first process started.
        atexit.register(self._finalizer)
        try:
            for rank in range(len(self._workers)):
                self._receive(rank, f"starting {name}")
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self._workers)

    def _receive(self, rank: int, what: str):
        """The next answer of worker ``rank``; raise if it failed or died."""
        process, conn = self._workers[rank]
        waited = 0.0
        while not conn.poll(1.0):
            waited += 1.0
            if not process.is_alive():
                raise RuntimeError(
                    f"{self.name} worker {rank} exited (code {process.exitcode}) while {what}; see its log above"
                )
            if self.timeout_s is not None and waited >= self.timeout_s:
                raise RuntimeError(f"{self.name} worker {rank} gave no answer in {waited:.0f}s while {what}")
        kind, payload = conn.recv()
        if kind == "user_error":
            raise UserError(payload)
        if kind == "error":
            raise RuntimeError(f"{self.name} worker {rank} failed while {what}:\n{payload}")
        return payload

    def run(self, payloads: list) -> list:
        """Send ``payloads[rank]`` to each worker (``None``: that worker sits this call out).

        Returns the answers by rank (``None`` for the idle ones). After an error the pool is
        closed: a worker's answer may still be in its pipe, so it cannot be used again.
        """
        if not self._workers:
            raise RuntimeError(f"the {self.name} workers are closed")
        if len(payloads) != len(self._workers):
            raise ValueError(f"{len(payloads)} payloads for {len(self._workers)} workers")
        busy = [rank for rank, payload in enumerate(payloads) if payload is not None]
        answers = [None] * len(payloads)
        try:
            for rank in busy:
                process, conn = self._workers[rank]
                try:
                    conn.send(("call", payloads[rank]))
                except OSError:  # the worker is gone (killed, out of host memory)
                    raise RuntimeError(f"{self.name} worker {rank} exited (code {process.exitcode}) "
                                       "before generating; see its log above") from None
            for rank in busy:
                answers[rank] = self._receive(rank, "generating")
        except BaseException:
            self.close()
            raise
        return answers

    def close(self) -> None:
        """Stop the workers (once; later calls do nothing)."""
        self._finalizer()
        atexit.unregister(self._finalizer)
