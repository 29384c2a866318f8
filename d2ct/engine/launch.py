"""Multi-process launch through Detectron2's launcher, with a CPU (gloo) path.

Detectron2's ``launch`` asserts CUDA and hard-codes NCCL. On a host without a GPU,
``--num-gpus N`` here starts N CPU processes that train with the gloo backend instead:
the same code path as multi-GPU training (DistributedDataParallel, sharded samplers, gathered
evaluation), which is how CI tests distributed training without a GPU.
"""
from __future__ import annotations

import logging
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from d2ct.utils.resources import cpu_threads

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT = timedelta(minutes=30)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(main_func, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str | None = None, args=(), timeout=DEFAULT_TIMEOUT):
    """Run ``main_func(*args)`` in ``num_machines * num_gpus_per_machine`` processes.

    With CUDA: Detectron2's launcher (NCCL, one process per GPU). Without: CPU processes with gloo.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if torch.cuda.is_available():
        return d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url or "auto", args=args, timeout=timeout)
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on one machine; pass --dist-url tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    # logging is not configured yet in the launching process: say it plainly
    print(f"[d2ct] no CUDA GPU: launching {num_gpus_per_machine} CPU processes per machine (gloo backend)",
          file=sys.stderr, flush=True)
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def launch_cli(main_func, args) -> int:
    """The tools' entry: ``launch(main_func, ...)`` with the launcher options parsed into ``args``
    (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``); exit status 0, or
    as :func:`d2ct.utils.cli.run_cli` says (a d2ct error: one line on stderr, status 2)."""
    from d2ct.utils.cli import run_cli

    def body() -> None:  # main_func's own result (e.g. the evaluation results) is not a status
        launch(main_func, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))

    return run_cli(body)


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout):
    global_rank = machine_rank * procs_per_machine + local_rank
    # Share the cores (or the OMP_NUM_THREADS the pipeline gave this training) between the
    # processes instead of oversubscribing them.
    torch.set_num_threads(max(1, cpu_threads() // procs_per_machine))
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                            rank=global_rank, timeout=timeout)
    # Detectron2's local process group: the ranks on this machine (as its own launcher sets it).
    num_machines = world_size // procs_per_machine
    for i in range(num_machines):
        ranks = list(range(i * procs_per_machine, (i + 1) * procs_per_machine))
        group = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
