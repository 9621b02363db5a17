"""Reproducible training: the same config gives the same adapter bit for bit, and so does a resumed run.

What decides it (measured on a 2-core CPU, torch 2.13, tiny model; tests/test_robustness.py pins the promise):

* CPU, same intra-op thread count: the same bits in every process only with Intel MKL's
  Conditional Numerical Reproducibility on. Without it, MKL chooses a GEMM code path by the
  arrays' memory alignment, which differs between processes: four 1-step runs of one config at
  the default 2 threads gave four different sets of LoRA gradients (the up matrices' weight
  gradients, last bits), hence different adapters. `import lora_offset` sets MKL_CBWR=AUTO (one
  path per CPU) unless the user set it: the same four runs then agreed bit for bit. MKL reads it
  once, at its first call, so a script that computes with torch before importing lora_offset
  must set MKL_CBWR itself.
* CPU, another thread count: different bits. torch's CPU convolutions split their sums by thread
  (the VAE's 1x1 conv_shortcut on a (2, 8, 32, 32) input already differs in the last bit between
  1 and 2 threads), and AdamW turns a last-bit difference in a near-zero gradient into a step of
  ±lr: after 6 steps, 380 of the tiny adapter's 576 tensors differed, by up to 8.6e-3. torch's default count is the number of CPUs the process may use (taskset, cpusets) unless
  OMP_NUM_THREADS says otherwise, so a resume started from another shell or under another
  affinity would silently train on with other bits. A deterministic run therefore keeps the count
  it started with: every state records it (state.py) and a resume uses it.
* CUDA: cuDNN's autotuner and atomics-based kernels (scatter/index_add backward, some
  convolution backward algorithms, cuBLAS's split-K workspaces) differ from run to run. A
  deterministic run sets torch.use_deterministic_algorithms (warn-only, so an op without a
  deterministic kernel warns instead of stopping a long run), cuDNN deterministic without
  benchmark, and CUBLAS_WORKSPACE_CONFIG=:4096:8 (cuBLAS's condition for deterministic GEMMs).
  These cost GPU speed, so `training.deterministic` defaults to true on CPU only, where it costs
  nothing.
* Data: batches, flips and caption shuffles are pure functions of (seed, step) and are computed in
  the training process (no loader workers), noise and timesteps come from one seeded generator
  saved in the state: nothing else to seed.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger("lora_offset")


def configure(deterministic: bool | None, device: torch.device, saved_num_threads: int | None) -> Callable[[], None]:
    """Apply `training.deterministic` (None: true on CPU, false on a GPU) before anything computes.

    `saved_num_threads`: the thread count recorded in the state being resumed, if any.
    Returns a function that puts back what was changed (for callers that train in-process).
    """
    on_cuda = device.type == "cuda"
    if deterministic is None:
        deterministic = not on_cuda
    if not deterministic:
        return lambda: None
    undo = []
    threads = torch.get_num_threads()
    if saved_num_threads and saved_num_threads != threads:
        log.warning("resuming with %d CPU threads, as the run that saved the state (this process would use %d): "
                    "a different count gives different bits; training.deterministic = false uses this "
                    "process's count instead", saved_num_threads, threads)
        torch.set_num_threads(saved_num_threads)
        undo.append(lambda: torch.set_num_threads(threads))
    if on_cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any GEMM
        previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

        def restore_cuda():
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]

        undo.append(restore_cuda)
    return lambda: [u() for u in reversed(undo)] and None
