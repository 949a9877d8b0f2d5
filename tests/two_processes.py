"""A process of test_distributed's 2-process check, in a module of its own: spawned processes import it, and it
imports only what the check needs (not gradio, not the test module)."""

import os
import threading

import torch

from studio.distributed import Processes


def two_process_worker(rank, init_file, results):
    """One of 2 processes (gloo) exercising what the loop asks of them at each update."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    procs = Processes(rank, 2, torch.device("cpu"))
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    params[0].grad = torch.full((3,), float(rank + 1))
    if rank == 0:  # process 1 ran no micro-batch touching params[1]: it adds zeros
        params[1].grad = torch.ones(2)
    loss = procs.sum_gradients(params, torch.tensor(0.25 * (rank + 1)))
    out_of_memory = procs.sum_gradients(params, None if rank == 1 else torch.tensor(1.0))
    stop = threading.Event()
    if rank == 1:
        stop.set()
    results.put((rank, loss.item(), params[0].grad.tolist(), params[1].grad.tolist(), out_of_memory,
                 procs.should_stop(stop)))
    torch.distributed.destroy_process_group()


def fsdp_leave_worker(rank, init_file, results):
    """One of 2 processes (gloo) that trains a step of an FSDP-wrapped model and drops it, as a run drops its engine,
    then leaves: reports how many of this process's threads leave() ended (gloo's workers)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = FSDP(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)), device_id=torch.device("cpu"))
    model(torch.randn(4, 8)).sum().backward()
    del model  # FSDP's modules and their states refer to each other: only the garbage collector frees them
    threads = len(os.listdir("/proc/self/task"))  # this process's threads, gloo's C++ workers included
    Processes(rank, 2, torch.device("cpu"), sharded=True).leave()
    results.put((rank, threads - len(os.listdir("/proc/self/task"))))
