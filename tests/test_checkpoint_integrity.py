"""Issue 19: checkpoint integrity without re-reading everything everywhere.

Each rank hashes the files it writes while writing them (rank 0 only gathers the hashes), a load checks only
the files the rank reads, and a checkpoint already verified (or written) by this process is not hashed again
unless a file changed on disk. What is refused stays refused (tests/test_hardening.py, unchanged).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mdaf_rec import checkpoint as ckpt
from mdaf_rec import manifest


@pytest.fixture
def hashed(monkeypatch) -> List[str]:
    """The names of the files whose bytes are hashed by reading them (not while writing them)."""
    calls: List[str] = []
    real = manifest.sha256_file

    def counting(path: Path) -> str:
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(manifest, "sha256_file", counting)
    monkeypatch.setattr(ckpt, "sha256_file", counting)
    return calls


def _state(fill: float = 0.0) -> Dict[str, Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    if fill:
        return {"model": {"w": torch.full((500, 8), fill), "b": torch.full((3,), fill)}}
    return {"model": {"w": torch.randn(500, 8, generator=g), "b": torch.arange(3.0)}}


def _manifest(path: Path) -> Dict[str, Dict]:
    return json.loads((path / ckpt.MANIFEST_FILE).read_text())["files"]


def test_save_hashes_while_writing_and_a_load_in_the_same_process_reads_nothing_twice(
    tmp_path: Path, hashed: List[str]
) -> None:
    path = ckpt.save_checkpoint(tmp_path, "epoch_1", _state(), {"epoch": 1}, is_best=True)
    assert hashed == []  # every file was hashed on its way to disk
    files = _manifest(path)
    assert sorted(files) == [".metadata", "__0_0.distcp", "rng_rank0.pt", "state.json"]
    assert sorted(files) == sorted(p.name for p in path.iterdir() if p.name != ckpt.MANIFEST_FILE)
    for name, entry in files.items():  # the hashes taken while writing are the files' hashes
        assert entry == {"sha256": hashlib.sha256((path / name).read_bytes()).hexdigest(),
                         "size": (path / name).stat().st_size}, name
    target = _state(fill=7.0)
    assert ckpt.load_checkpoint(path, target) == {"epoch": 1}
    assert torch.equal(target["model"]["w"], _state()["model"]["w"])
    assert hashed == []  # the final evaluation of a run reuses what its save hashed


def test_a_changed_file_is_hashed_again_and_refused(tmp_path: Path, hashed: List[str]) -> None:
    path = ckpt.save_checkpoint(tmp_path, "epoch_1", _state(), {}, is_best=True)
    time.sleep(0.02)  # past one coarse timestamp tick (kernels before 6.13; see mdaf_rec.manifest)
    weights = path / "__0_0.distcp"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))  # same size, same inode: ctime / mtime tell
    with pytest.raises(ckpt.CheckpointError, match=r"__0_0\.distcp: content does not match the checkpoint's manifest"):
        ckpt.load_checkpoint(path, _state(fill=1.0))
    assert hashed == ["__0_0.distcp"]  # the unchanged .metadata is not read again
    # Restored byte for byte (a new ctime): hashed once more, then loads.
    time.sleep(0.02)
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    hashed.clear()
    ckpt.load_checkpoint(path, _state(fill=1.0))
    assert hashed == ["__0_0.distcp"]


def test_a_copied_checkpoint_is_hashed_once_per_process(tmp_path: Path, hashed: List[str]) -> None:
    saved = ckpt.save_checkpoint(tmp_path / "a", "epoch_1", _state(), {}, is_best=True)
    copy = tmp_path / "b"
    shutil.copytree(saved, copy)
    ckpt.load_checkpoint(copy, _state(fill=1.0))
    assert sorted(hashed) == [".metadata", "__0_0.distcp", "rng_rank0.pt", "state.json"]
    hashed.clear()
    ckpt.load_checkpoint(copy, _state(fill=1.0))
    assert hashed == []


def test_a_file_the_manifest_does_not_list_is_refused(tmp_path: Path) -> None:
    path = ckpt.save_checkpoint(tmp_path, "epoch_1", _state(), {}, is_best=True)
    files = _manifest(path)
    del files["rng_rank0.pt"]
    (path / ckpt.MANIFEST_FILE).write_text(json.dumps({"files": files}))
    with pytest.raises(ckpt.CheckpointError, match=r"rng_rank0\.pt: not listed in the checkpoint's manifest"):
        ckpt.load_checkpoint(path, _state(fill=1.0))


def _rank_worker(rank: int, world: int, root: str) -> None:
    """Saves a row-sharded DTensor on 2 ranks, then loads a copy written by no process of this job; records
    the files each rank hashed by reading them."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls: List[str] = []
    real = manifest.sha256_file
    manifest.sha256_file = ckpt.sha256_file = lambda p: (calls.append(Path(p).name), real(p))[1]  # type: ignore
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = torch.arange(64 * 4, dtype=torch.float32).reshape(64, 4)
        state = {"model": {"table": distribute_tensor(full, mesh, [Shard(0)])}}
        path = ckpt.save_checkpoint(Path(root) / "run", "epoch_1", state, {"epoch": 1}, is_best=True)
        saved = list(calls)
        calls.clear()
        if rank == 0:
            shutil.copytree(path, Path(root) / "copy")
        dist.barrier()
        target = {"model": {"table": distribute_tensor(torch.zeros(64, 4), mesh, [Shard(0)])}}
        ckpt.load_checkpoint(Path(root) / "copy", target)
        assert torch.equal(target["model"]["table"].full_tensor(), full)
        Path(root, f"rank{rank}.json").write_text(json.dumps({"save": saved, "load": sorted(set(calls))}))
    finally:
        dist.destroy_process_group()


def test_each_rank_hashes_what_it_writes_and_verifies_only_what_it_reads(tmp_path: Path) -> None:
    from test_train import _free_port

    os.environ["TEST_PORT"] = str(_free_port())
    mp.spawn(_rank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    files = _manifest(tmp_path / "run" / "checkpoints" / "epoch_1")
    assert sorted(files) == [".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt", "state.json"]
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["save"] == []  # nothing re-read at save, on any rank
        # each rank reads the metadata, its own shard, its RNG file and state.json: nothing of the other rank
        assert record["load"] == sorted([".metadata", f"__{rank}_0.distcp", f"rng_rank{rank}.pt", "state.json"])
