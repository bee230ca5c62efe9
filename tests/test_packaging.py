"""The project as an installed package: a wheel (``pip wheel --no-deps .``) installed away from the checkout
runs ``mdaf-rec demo --help`` and resolves the packaged configs by name; the private TorchRec functions the
planner's report relies on are where the pinned torchrec keeps them."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from mdaf_rec.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd: Path, env=None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _source_tree(dest: Path) -> Path:
    """What ``pip wheel .`` reads from a fresh clone (the package, its configs, pyproject.toml, the README): a
    copy, because setuptools builds in place and a reused ``build/`` folder can leak deleted modules into a wheel."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "mdaf_rec", dest / "mdaf_rec", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "configs", dest / "configs")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def test_wheel_runs_the_command_and_finds_the_packaged_configs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    source = _source_tree(tmp_path / "src")
    _run([*pip, "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation", str(source), "-w", "wheels"],
         tmp_path, env)
    (wheel,) = (tmp_path / "wheels").glob("mdaf_rec-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        packaged = {n for n in zf.namelist() if n.startswith("mdaf_rec/")}
    sources = {(Path(folder) / f).relative_to(source).as_posix()
               for folder, _, files in os.walk(source / "mdaf_rec", followlinks=True)  # into mdaf_rec/configs
               for f in files if Path(f).suffix in (".py", ".yaml", ".cpp", ".h")}
    assert packaged == sources, sorted(packaged ^ sources)
    site = tmp_path / "site"
    _run([*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)], tmp_path, env)
    env["PYTHONPATH"] = str(site)  # ahead of the checkout's editable install
    help_text = _run([str(site / "bin" / "mdaf-rec"), "demo", "--help"], tmp_path, env)
    assert "usage: mdaf-rec demo" in help_text
    where = _run([sys.executable, "-c",
                  "import mdaf_rec, mdaf_rec.config as c; print(mdaf_rec.__file__); print(c.resolve_config_path('demo'));"
                  "print(c.packaged_config_names())"], tmp_path, env).splitlines()
    assert Path(where[0]).is_relative_to(site), where
    demo = Path(where[1])
    assert demo.is_relative_to(site) and demo.is_file() and not demo.is_symlink(), where
    assert eval(where[2]) == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))  # noqa: S307 - our own print
    assert yaml.safe_load(demo.read_text()) == yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())


def test_a_bare_config_name_is_the_packaged_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for name in ("demo", "mdaf_mamba", "plan_taobao"):
        assert to_dict(load_config(name)) == to_dict(load_config(REPO / "configs" / f"{name}.yaml"))
    (tmp_path / "demo").write_text("model: {name: bst}\n")  # a file of that name wins
    assert load_config("demo").model.name == "bst"


def test_private_torchrec_planner_functions_are_present() -> None:
    """``mdaf_rec.planning`` computes per-rank memory and time as TorchRec's EmbeddingStats does, with two
    private functions of torchrec 1.8.0 (pinned in requirements/torchrec.txt and pyproject.toml). When an
    upgrade moves them, this names what to port."""
    stats = importlib.import_module("torchrec.distributed.planner.stats")
    missing = [f for f in ("_compute_mem_usage_and_perf", "_compute_storage") if not callable(getattr(stats, f, None))]
    assert not missing, f"torchrec.distributed.planner.stats lost {missing}: port mdaf_rec.planning._report"
