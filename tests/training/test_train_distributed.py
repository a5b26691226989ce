"""Two CPU processes (gloo DDP) through ``accelerate launch``: prototypes stay identical across
processes while each process trains on its own shard of the data.

Two launchers are tested. ``accelerate launch --cpu --num_processes 2 --mpirun_hostfile H``
starts the processes with MPI (Open MPI's ``mpirun``; accelerate 1.15 runs a single process for
``--cpu`` without a hostfile). ``--multi_gpu --num_processes 2`` starts them through
torch.distributed.run, and ``training.train`` puts Accelerate on the CPU (gloo) when
``WORLD_SIZE > 1`` and no accelerator device exists. The launched script
(``distributed_run.py``) trains with a callback that records each process's prototypes and the
image ids it trained on; the checkpoint folder holds one RNG state and one memory bank per
process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, SIM_EXERCISE, TINY_CONFIG

pytestmark = pytest.mark.slow

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_two_process_cpu_run_keeps_prototypes_identical(tiny_data, tmp_path: Path,
                                                        launcher: str) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if launcher == "torchrun":
        how = ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    else:
        if shutil.which("mpirun") is None:
            pytest.skip("mpirun not installed (apt-get install openmpi-bin; .ci/install.sh does)")
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=2\n")
        how = ["--cpu", "--num_processes", "2", "--mpirun_hostfile", str(hostfile)]
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how,
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(Path(__file__).with_name("distributed_run.py")), "--config", str(TINY_CONFIG),
           *tiny_data.overrides(out),
           "data.val_json=null", f"optim.max_iter={STEPS}", "checkpoint_every=0",
           "sim.start_iter=0", *SIM_EXERCISE]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    dumps = [torch.load(out / "per_rank" / f"rank{r}.pt") for r in (0, 1)]
    assert [d["rank"] for d in dumps] == [0, 1]
    assert [d["step"] for d in dumps] == [STEPS, STEPS]
    # Identical prototypes on both processes, and they did move from the seeded start.
    from training.sim import PrototypeMemory

    protos = [d["prototypes"] for d in dumps]
    assert torch.equal(protos[0], protos[1])
    c, l_, dim = protos[0].shape
    init = PrototypeMemory(c, l_, dim, seed=0).prototypes
    assert (protos[0] - init).abs().max() > 1e-3
    # Each step the two processes trained on different images (disjoint shards of 2 + 2).
    ids = [d["image_ids"] for d in dumps]
    assert len(ids[0]) == len(ids[1]) == STEPS
    for a, b in zip(*ids):
        assert len(a) == len(b) == 2 and not set(a) & set(b)
    # A real 2-process run: one RNG state and one memory bank per process in the final
    # checkpoint, whose saved prototypes are the ones both processes hold.
    from training.run_checkpoints import SIM_STATE, read_tensor_state

    final = out / "checkpoints" / f"step_{STEPS:07d}"
    for rank in (0, 1):
        assert (final / f"random_states_{rank}.pkl").is_file()
        assert (final / f"memory_bank_{rank}.safetensors").is_file()
    saved = read_tensor_state(final / SIM_STATE)["prototypes"]["prototypes"]
    assert torch.equal(saved, protos[0])
    assert (out / "model_final.safetensors").is_file()
