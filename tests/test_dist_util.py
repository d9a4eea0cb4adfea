"""dist_util: launcher detection, plain single-process behaviour, lazy mpi4py, and the 2-rank helpers."""

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from tiny import LAUNCH_VARS, TORCHRUN_2, script_env

from improved_diffusion import dist_util

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "none"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "torchrun"),
        ({"PMI_RANK": "1"}, "mpi"),
        ({"OMPI_COMM_WORLD_RANK": "0"}, "mpi"),
        ({"PMIX_RANK": "0"}, "mpi"),
    ],
)
def test_detect_launcher(monkeypatch, env, expected):
    for var in LAUNCH_VARS + ("MV2_COMM_WORLD_RANK",):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dist_util.detect_launcher() == expected


def test_plain_process_needs_no_mpi_and_no_group():
    code = textwrap.dedent(
        """
        import sys
        from improved_diffusion import dist_util
        dist_util.setup_dist()
        assert "mpi4py" not in sys.modules, "mpi4py was imported in a plain run"
        assert not dist_util.is_initialized()
        assert (dist_util.get_rank(), dist_util.get_world_size()) == (0, 1)
        assert dist_util.is_main_process() and dist_util.launcher() == "none"
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=script_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _no_mpi(monkeypatch, env, mpi4py_module):
    """An MPI launcher's environment ``env``, ``mpi4py_module`` in place of mpi4py (None: not installed)."""
    for var in LAUNCH_VARS + ("MV2_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(sys.modules, "mpi4py", mpi4py_module)
    monkeypatch.setattr(dist_util, "_launcher", "none")  # restored after the test


def _mpi4py_without_libmpi():
    module = types.ModuleType("mpi4py")

    def __getattr__(name):  # what mpi4py 4 does on `from mpi4py import MPI` when no libmpi loads
        raise RuntimeError("cannot load MPI library\nlibmpi.so: cannot open shared object file")

    module.__getattr__ = __getattr__
    return module


@pytest.mark.parametrize("mpi4py_module", [None, "no_libmpi"])
def test_mpi_singleton_without_mpi4py_runs_plain(monkeypatch, mpi4py_module):
    module = _mpi4py_without_libmpi() if mpi4py_module == "no_libmpi" else None
    _no_mpi(monkeypatch, {"PMI_RANK": "0", "PMI_SIZE": "1"}, module)
    dist_util.setup_dist()
    assert dist_util.launcher() == "mpi"
    assert not dist_util.is_initialized() and dist_util.get_world_size() == 1


@pytest.mark.parametrize(
    "mpi4py_module, problem",
    [(None, "mpi4py is not installed"), ("no_libmpi", "mpi4py cannot load an MPI library")],
)
@pytest.mark.parametrize("env", [{"PMI_RANK": "1", "PMI_SIZE": "2"}, {"PMIX_RANK": "0"}])
def test_mpi_world_without_mpi4py_says_what_to_install(monkeypatch, mpi4py_module, problem, env):
    module = _mpi4py_without_libmpi() if mpi4py_module == "no_libmpi" else None
    _no_mpi(monkeypatch, env, module)
    with pytest.raises(dist_util.LauncherError) as info:
        dist_util.setup_dist()
    message = str(info.value)
    assert "\n" not in message and problem in message and ".[mpi]" in message and "torchrun" in message
    assert not dist_util.is_initialized()


def test_single_process_helpers(tmp_path):
    path = str(tmp_path / "w.pt")
    torch.save({"w": torch.arange(3.0)}, path)
    assert torch.equal(dist_util.load_state_dict(path)["w"], torch.arange(3.0))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        dist_util.load_state_dict(str(tmp_path / "missing.pt"))
    p = torch.ones(2)
    dist_util.sync_params([p])  # no-op
    dist_util.barrier()
    assert torch.equal(p, torch.ones(2))
    assert dist_util.broadcast_object({"a": 1}) == {"a": 1}
    assert dist_util.all_gather_object(5) == [5]
    assert dist_util.dev() == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


TWO_RANK_SCRIPT = textwrap.dedent(
    """
    import builtins, os, sys
    import torch
    from improved_diffusion import dist_util

    dist_util.setup_dist()
    rank = dist_util.get_rank()
    assert dist_util.get_world_size() == 2 and dist_util.launcher() == sys.argv[2]
    assert os.environ["MASTER_ADDR"] and os.environ["MASTER_PORT"]
    path = sys.argv[1]
    if rank == 1:  # only rank 0 may touch the file
        real_open = builtins.open
        def guarded(file, *a, **k):
            assert os.path.abspath(str(file)) != os.path.abspath(path), "rank 1 opened the checkpoint"
            return real_open(file, *a, **k)
        builtins.open = guarded
    state = dist_util.load_state_dict(path)
    assert torch.equal(state["w"], torch.arange(5.0)), state
    try:
        dist_util.load_state_dict(path + ".missing")
        raise AssertionError("no error for a missing file")
    except FileNotFoundError:
        pass
    params = [torch.full((3,), float(rank)), torch.full((2, 2), 10.0 + rank)]
    dist_util.sync_params(params)
    assert torch.equal(params[0], torch.zeros(3)) and torch.equal(params[1], torch.full((2, 2), 10.0))
    assert dist_util.broadcast_object("from %d" % rank) == "from 0"
    assert dist_util.all_gather_object(rank) == [0, 1]
    dist_util.barrier()
    os.write(1, ("rank %d ok\\n" % rank).encode())  # one write: the ranks share stdout
    dist_util.cleanup_dist()
    """
)


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason=f"no mpiexec at {MPIEXEC}")
def test_two_ranks_under_mpiexec(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT)
    ckpt = str(tmp_path / "ckpt.pt")
    torch.save({"w": torch.arange(5.0)}, ckpt)
    cmd = [MPIEXEC, "-n", "2", sys.executable, str(script), ckpt, "mpi"]
    out = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout


def test_two_ranks_under_torchrun(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT)
    ckpt = str(tmp_path / "ckpt.pt")
    torch.save({"w": torch.arange(5.0)}, ckpt)
    cmd = [*TORCHRUN_2, str(script), ckpt, "torchrun"]
    out = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout
