"""Entry point of every trainer container: `python -m codistill_trainer.worker`.

Reads who it is from the env contract (docs/architecture.md) and what to do from `run.json` in the
run folder, joins its group's DDP world and trains. A TrainJob starts it under torchrun, which
turns the PET_* variables Kubeflow Trainer injects into RANK, WORLD_SIZE and the rest. In a
PyTorchJob with `nprocPerWorker` > 1 the pod hands over to torchrun itself, reading the PET_*
variables the Training Operator injects.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from codistill import names
from codistill.runfolder import RunFolder
from codistill.spec import Codistillation
from codistill.storage import Bucket, StorageError

from .loop import FINAL_TIMEOUT_S, Loop, Member
from .report import write_report
from .uploader import MAX_BACKOFF_S

log = logging.getLogger("codistill.worker")


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"codistill worker: environment variable {name} is not set "
                         f"(the operator or `codistill run` sets it)")
    return value


def _hand_over_to_torchrun() -> bool:
    """Several processes per pod: relaunch under torchrun (once; its children skip this)."""
    nproc = int(os.environ.get("PET_NPROC_PER_NODE", "1") or 1)
    if nproc <= 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        return False
    from torch.distributed.run import main as torchrun

    torchrun(["--nnodes", os.environ.get("PET_NNODES", "1"),
              "--node-rank", os.environ.get("PET_NODE_RANK", "0"),
              "--nproc-per-node", str(nproc),
              "--master-addr", os.environ.get("PET_MASTER_ADDR", _env("MASTER_ADDR")),
              "--master-port", os.environ.get("PET_MASTER_PORT", _env("MASTER_PORT")),
              "-m", "codistill_trainer.worker"])
    return True


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _limit_threads() -> None:
    """Share the container's CPU limit between its processes (OMP_NUM_THREADS, if set, wins)."""
    cpus = os.environ.get(names.ENV_CPUS, "")
    if cpus.isdigit() and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        torch.set_num_threads(max(1, int(cpus) // local))


def _report(folder: RunFolder, run: Codistillation) -> None:
    """Write the report if every group has finished. This group's own work is committed by now,
    so a store that fails here is waited out for as long as the final publish would be, and then
    left to `codistill report`: failing the group would only make it run again."""
    deadline, delay = time.monotonic() + FINAL_TIMEOUT_S, 1.0
    while True:
        try:
            if write_report(folder, run):
                log.info("all groups finished: report written to %s", folder.where(names.REPORT))
            return
        except StorageError as e:
            if time.monotonic() + delay > deadline:
                log.error("report not written (%s); `codistill report %s` writes it", e,
                          folder.bucket.url)
                return
            log.warning("report not written yet (%s); trying again in %.0f s", e, delay)
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)


def main() -> None:
    faulthandler.enable()  # a native crash still leaves every thread's Python stack in the log
    if _hand_over_to_torchrun():
        return
    group, rank = int(_env(names.ENV_GROUP)), int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s g{group} r{rank} %(levelname)s %(name)s: %(message)s")
    folder = RunFolder(Bucket(_env(names.ENV_RUN_URL)))
    run = folder.read_run()
    if run is None:
        raise SystemExit(f"codistill worker: {folder.where(names.RUN_JSON)} does not exist")
    if int(os.environ.get(names.ENV_GROUPS, run.spec.groups)) != run.spec.groups:
        raise SystemExit(f"codistill worker: {names.ENV_GROUPS}={os.environ[names.ENV_GROUPS]} "
                         f"but {folder.where(names.RUN_JSON)} has groups {run.spec.groups}: the "
                         f"job and the run folder disagree")
    device = _device()
    _limit_threads()
    if world > 1:
        # NCCL carries only CUDA tensors; the steps and RNG states the ranks agree on are CPU
        # tensors, which need gloo beside it.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=run.spec.training.rendezvous_timeout_seconds)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    try:
        Loop(Member(run, group, rank, world, folder.bucket, device)).run()
        if rank == 0:
            _report(folder, run)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if world > 1:
        _exit_before_teardown()


def _exit_before_teardown() -> None:
    """End a distributed worker whose work is committed without the interpreter's teardown.

    Past destroy_process_group, the destructors that run at interpreter exit can still meet
    gloo's threads and abort the process ("terminate called without an active exception",
    SIGABRT: about 1 exit in 40 of a bare two-rank DDP script here, more on a loaded machine).
    torchrun and the Training Operator read that as a failed replica and restart the group."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
