"""pos2distill.worker_pool: spawned workers, their errors and their shutdown.

The engine here is a list of token-id rows (``build=list``) and the request a length limit
(``serve=check_model_len``): cheap to spawn, and it raises the project's UserError on demand.
"""

import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from pos2distill.errors import UserError
from pos2distill.generation.base import check_model_len
from pos2distill.worker_pool import WorkerPool


def _no_workers_left():
    return all(not p.is_alive() for p in multiprocessing.active_children())


def test_user_error_in_a_worker_is_a_user_error_here():
    pool = WorkerPool(list, check_model_len, ["", ""], [([[1, 2, 3]],)] * 2, name="test")
    assert len(pool) == 2 and pool.devices == ["", ""]
    assert pool.run([5, None]) == [None, None]  # a limit above 3 tokens: fine; worker 1 sits out
    with pytest.raises(UserError, match="prompt 0 has 3 tokens, more than --max_model_len 2"):
        pool.run([5, 2])
    with pytest.raises(RuntimeError, match="the test workers are closed"):  # an error closes the pool
        pool.run([5, 5])
    pool.close()  # a second close does nothing
    assert _no_workers_left()


def test_a_dead_worker_is_reported_and_the_others_stopped():
    pool = WorkerPool(list, check_model_len, ["", ""], [([[1]],)] * 2, name="test")
    process = pool._workers[1][0]
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=30)
    with pytest.raises(RuntimeError, match="test worker 1 exited"):
        pool.run([5, 5])
    assert _no_workers_left()


def test_a_failed_start_stops_every_worker():
    with pytest.raises(RuntimeError, match="test worker 1 failed while starting test"):
        WorkerPool(int, check_model_len, ["", ""], [("1",), ("not a number",)], name="test")
    assert _no_workers_left()


EXIT_SCRIPT = """
from pos2distill.generation.base import check_model_len
from pos2distill.worker_pool import WorkerPool

if __name__ == "__main__":
    POOL = WorkerPool(list, check_model_len, ["", ""], [([[1]],)] * 2, name="test")
    print(POOL.run([5, 5]))
"""


def test_a_pool_left_open_does_not_hang_the_exit(tmp_path):
    # non-daemonic workers waiting for requests: multiprocessing's exit handler would wait forever
    script = tmp_path / "left_open.py"
    script.write_text(EXIT_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[None, None]"
