"""`torchrun`: a PyTorch script on `nodes` machines at once (the 2022 provider): a multi-node run whose every job
starts `torchrun` with the rendezvous set from the master's address (`--nnodes`, `--node_rank`, `--master_addr`,
`--master_port`, `--nproc_per_node`). Where `torchrun` is not installed, each job starts the script once with
Python and the environment torchrun would give its one process (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), and says so."""

from __future__ import annotations

import shlex
from typing import Any

from pydantic import Field, field_validator

from dstack.core.models import JobSpec
from dstack.providers.python import PythonProvider, PythonSpec


class TorchrunSpec(PythonSpec):
    """A PyTorch script run by torchrun on `nodes` machines (default 2), `nproc_per_node` processes each."""

    nodes: int = Field(2, ge=1, le=64, description="How many machines (jobs) the run takes at once.")
    nproc_per_node: int | str = Field(1, description="Processes per machine: a number, or `gpu` (one per GPU).")

    @field_validator("nproc_per_node", mode="before")
    @classmethod
    def _nproc(cls, v: Any) -> Any:
        if v is None:
            return 1
        if isinstance(v, str) and v.strip() in ("gpu", "auto", "cpu"):
            return v.strip()
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
        raise ValueError("nproc_per_node is a number of processes (1 or more), or gpu, cpu, auto")


class TorchrunProvider(PythonProvider):
    name = "torchrun"
    Spec = TorchrunSpec

    def own_args(self, parser) -> None:
        """`dstack run torchrun --nnodes N FILE [ARGS]` (2022)."""
        parser.add_argument("--nnodes", type=int)
        parser.add_argument("--nproc_per_node", "--nproc-per-node", dest="nproc_per_node")
        super().own_args(parser)

    def own_keys(self, known) -> dict[str, Any]:
        out = super().own_keys(known)
        if known.nnodes is not None:
            out["nodes"] = known.nnodes
        if known.nproc_per_node is not None:
            out["nproc_per_node"] = int(known.nproc_per_node) if known.nproc_per_node.isdigit() \
                else known.nproc_per_node
        return out

    def create_jobs(self, spec: Any, env: dict[str, str]) -> list[JobSpec]:
        jobs = super().create_jobs(spec, env)
        for job in jobs:
            python_line = job.commands[-1]  # `pythonX file args`, as the python provider makes it
            python, _, rest = python_line.partition(" ")
            torchrun = (f'torchrun --nnodes="$WORLD_SIZE" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" '
                        f'--master_port="$MASTER_PORT" --nproc_per_node={shlex.quote(str(spec.nproc_per_node))} '
                        f"{rest}")
            fallback = (f'echo "[dstack: torchrun is not installed: {rest.split(" ")[0]} runs once on this node with '
                        f'python, RANK=$RANK of WORLD_SIZE=$WORLD_SIZE]" >&2; '
                        f'LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 exec {python} {rest}')
            job.commands[-1] = f"if command -v torchrun > /dev/null; then exec {torchrun}; else {fallback}; fi"
        return jobs
