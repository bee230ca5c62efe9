"""TorchX components: ``torchx run launch/components.py:train ...`` (see ``docs/launch.md``).

:func:`train` is TorchX's ``dist.ddp`` (one role, ``nnodes`` replicas, ``torchrun`` with c10d rendezvous on
rank 0's host) running ``python -m mdaf_rec.cli train``. The same component runs on ``local_cwd`` (this
machine; with ``--nnodes 2`` both "nodes" are local processes rendezvousing on localhost), Slurm and
Kubernetes; ``cpu:gloo,cuda:nccl`` is chosen automatically when the workers see a GPU, ``gloo`` otherwise.

Container schedulers (``kubernetes``, ``local_docker``) run ``--image``: the repository's ``Dockerfile`` builds
it (``docker build -t mdaf-rec:latest .`` makes the default tag, local to the machine that built it); a cluster
needs it pushed to a registry and named with ``--image`` (``docs/launch.md``, "Container image").
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

from mdaf_rec.distributed import NO_GPU_REQUESTED


def train(
    *overrides: str,
    config: str = "configs/demo.yaml",
    data: Optional[str] = None,
    out: Optional[str] = None,
    epochs: Optional[int] = None,
    plan: Optional[str] = None,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    image: str = "mdaf-rec:latest",
    name: str = "/mdaf-rec-train",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    cpu_only: bool = False,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Trains an MDAF model with ``mdaf-rec train`` on ``nnodes`` x ``nproc_per_node`` processes.

    Args:
        overrides: config overrides ``key=value`` (each becomes ``--set key=value``), e.g. ``train.epochs=2``.
        config: YAML config, relative to the job's working directory (the repo / image workdir).
        data: canonical dataset folder (overrides ``data.path``).
        out: run directory (default ``runs/<model>``); on a cluster, a shared filesystem path.
        epochs: overrides ``train.epochs``.
        plan: sharding plan JSON from ``mdaf-rec plan --json`` (made for ``nnodes * nproc_per_node`` ranks).
        nnodes: number of hosts (replicas of the role).
        nproc_per_node: processes per host (one per GPU on GPU hosts).
        image: container image for ``local_docker`` / ``kubernetes``, built from the repository's ``Dockerfile``;
            the default ``mdaf-rec:latest`` is the tag ``docker build -t mdaf-rec:latest .`` gives it on this
            machine (on Kubernetes, the base TorchX builds the workspace onto and pushes to ``-cfg image_repo``;
            or push it yourself and pass ``--image REGISTRY/mdaf-rec:TAG --workspace ""``). Ignored by
            ``local_cwd`` and ``slurm`` (they run in the current directory with its virtualenv).
        name: ``{experiment}/{run}`` job name.
        h: a registered named resource (e.g. ``aws_p4d.24xlarge``); takes precedence over cpu/gpu/memMB.
        cpu: CPUs per host.
        gpu: GPUs per host (set it to ``nproc_per_node`` on GPU hosts). A job given none (the default) refuses
            to start on Slurm or Kubernetes unless ``cpu_only`` (it would train on CPU with gloo); ``local_cwd`` and
            ``local_docker`` run it on CPU as asked.
        cpu_only: allow a job without GPUs on Slurm / Kubernetes.
        memMB: host memory in MB.
        env: extra environment variables (``KEY=VALUE,KEY2=VALUE2`` on the command line).
        rdzv_port: port of the c10d rendezvous store on rank 0's host (multi-node only).
        max_retries: scheduler retries of the whole job.
        mounts: docker/kubernetes mounts (``type=bind,src=/data,dst=/data``).
    Returns:
        The ``AppDef``.
    """
    args: List[str] = ["train", "--config", config]
    if data is not None:
        args += ["--data", data]
    if out is not None:
        args += ["--out", out]
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    if plan is not None:
        args += ["--plan", plan]
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} is not of the form key=value")
        args += ["--set", override]
    job_env = {"PYTHONUNBUFFERED": "1", **(env or {})}
    if gpu == 0 and h is None and not cpu_only:
        job_env[NO_GPU_REQUESTED] = "1"  # checked by the workers (mdaf_rec.distributed.check_gpu_request)
    return ddp(
        *args,
        m="mdaf_rec.cli",
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=job_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
