"""Running the demo's jobs: `workers` at once, each job after the jobs it needs, each in a process of its own.

A job process is forked from multiprocessing's fork server, which imported torch, diffusers,
transformers, peft and lora-offset's job code once (PRELOAD): a job starts in a fraction of a
second instead of paying the ~7 s of imports that a fresh `python -m ...` pays, and still starts
from a clean process (no training or sampling state carried over from another job). The server
is started with one torch thread and the demo's quiet environment (WORKER_ENV) and never computes,
so the processes forked from it start with no thread pools.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

from lora_offset.errors import UserError

# Imported once in the fork server: every module a job needs that takes long to import.
PRELOAD = [
    "lora_offset.experiments.demo_jobs",
    "lora_offset.training.train",
    "lora_offset.experiments.evaluate",
    "lora_offset.experiments.sample",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.autoencoders.autoencoder_kl",
    "transformers.models.clip.modeling_clip",
]
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


class Job(Protocol):
    def wait(self) -> int: ...


class _ForkedJob:
    def __init__(self, process):
        self.process = process

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_fork_server():
    """The fork server, started now (its imports then run while the caller prepares the data)."""
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with _environment(WORKER_ENV):  # what the server, and so every job, inherits
        forkserver.ensure_running()
    return context


def start_forked_job(out: Path, args: list[str], logfile: Path) -> Job:
    from lora_offset.experiments import demo_jobs

    context = start_fork_server()
    process = context.Process(target=demo_jobs.run_logged, args=(str(out), list(args), str(logfile)))
    process.start()
    return _ForkedJob(process)


def job_log(out: Path, job_id: str) -> Path:
    return out / "logs" / f"{job_id.replace(' ', '-')}.log"


def run_jobs(out: Path, plan, workers: int, say: Callable[[str], None],
             start: Callable[[Path, list[str], Path], Job] = start_forked_job) -> dict[str, float]:
    """Run the plan: `workers` jobs at once (`start(out, args, logfile)` starts one; default: forked
    from the fork server), or in-process one after another with workers = 0. A job's output goes to
    DIR/logs/<job>.log (job_log); a failed job stops the demo (after the running ones finish) with its
    log's tail. Returns each job's seconds."""
    from lora_offset.experiments import demo_jobs

    timings: dict[str, float] = {}
    if workers == 0:
        for job_id, args, _ in plan:  # plan order respects every job's needs
            say(f"{job_id}: started")
            t0 = time.perf_counter()
            demo_jobs.main([args[0], str(out), *args[1:]])
            timings[job_id] = time.perf_counter() - t0
            say(f"{job_id}: done in {timings[job_id]:.0f} s")
        return timings
    done: set[str] = set()
    pending = list(plan)
    running: set[str] = set()
    failures: list[str] = []
    lock = threading.Condition()
    (out / "logs").mkdir(parents=True, exist_ok=True)

    def run_one(job_id: str, args: list[str]) -> None:
        t0 = time.perf_counter()
        logfile = job_log(out, job_id)
        ok = start(out, args, logfile).wait() == 0
        with lock:
            timings[job_id] = time.perf_counter() - t0
            if ok:
                done.add(job_id)
                say(f"{job_id}: done in {timings[job_id]:.0f} s")
            else:
                tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
                failures.append(f"demo job '{job_id}' failed; the end of {logfile}:\n  " + "\n  ".join(tail))
            running.discard(job_id)
            lock.notify_all()

    with lock:
        while (pending or running) and not failures:
            ready = [j for j in pending if all(d in done for d in j[2])]
            if ready and len(running) < workers:
                job_id, args, _ = ready[0]
                pending.remove(ready[0])
                running.add(job_id)
                say(f"{job_id}: started")
                threading.Thread(target=run_one, args=(job_id, args), daemon=True).start()
            else:
                lock.wait()
        while running:
            lock.wait()
    if failures:
        raise UserError(failures[0])
    return timings
