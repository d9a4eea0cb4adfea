"""Helpers for distributed training: one code path for ``mpiexec``, ``torchrun`` and plain runs.

How the launcher is recognised (:func:`setup_dist`):

- ``torchrun`` (or any launcher that exports ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``): the
  process group is created from those variables; ``LOCAL_RANK`` picks the GPU.
- ``mpiexec -n N`` (MPICH/Hydra, Open MPI, Intel MPI, Slurm's PMI/PMIx): rank and world size come from mpi4py;
  rank 0 chooses the rendezvous address and a free port and broadcasts them over MPI, and every rank exports
  ``MASTER_ADDR``/``MASTER_PORT`` before joining the torch process group.
- Anything else is a plain single process: no MPI runtime is needed (mpi4py is imported only when an MPI
  launcher is detected), no process group is created, ``get_rank() == 0`` and ``get_world_size() == 1``.

mpi4py is optional (``pip install -e '.[mpi]'``, which also needs an MPI library at run time). Under an MPI
launcher without a usable mpi4py, a world of one (``PMI_SIZE``, ``OMPI_COMM_WORLD_SIZE`` or
``MV2_COMM_WORLD_SIZE`` = 1) runs as a plain process; a larger world raises :class:`LauncherError` saying
what to install (or to launch with ``torchrun`` instead).

Backend: ``nccl`` on CUDA (device = local rank), ``gloo`` on CPU. Set ``IMPROVED_DIFFUSION_DIST_BACKEND`` to
override it (e.g. ``gloo`` on a GPU node whose NCCL is broken).
"""

import io
import os
import socket
from typing import Any, Iterable, Optional, Tuple

import torch
import torch.distributed as dist

# Rank variables that MPI launchers export to every process: PMI_* (MPICH/Hydra, Intel MPI, srun --mpi=pmi2),
# OMPI_* (Open MPI), PMIX_* (PMIx, e.g. srun --mpi=pmix), MV2_* (MVAPICH2).
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
# World-size variables of the same launchers (PMIx exports none; its world size is then unknown here).
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")

_local_rank = 0
_launcher = "none"


class LauncherError(RuntimeError):
    """The launcher asks for several processes, but this installation cannot join them (one line)."""


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from err


def detect_launcher() -> str:
    """Return ``"torchrun"``, ``"mpi"`` or ``"none"`` from the environment (without importing mpi4py)."""
    if os.environ.get("RANK") is not None and os.environ.get("WORLD_SIZE") is not None:
        return "torchrun"
    if any(os.environ.get(v) is not None for v in _MPI_RANK_VARS):
        return "mpi"
    return "none"


def launcher() -> str:
    """The launcher that :func:`setup_dist` recognised (``"torchrun"``, ``"mpi"`` or ``"none"``)."""
    return _launcher


def _default_backend() -> str:
    override = os.environ.get("IMPROVED_DIFFUSION_DIST_BACKEND")
    if override:
        return override
    return "nccl" if torch.cuda.is_available() else "gloo"


def _free_port() -> int:
    """A TCP port that is free right now on this host (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return int(sock.getsockname()[1])


def _host_address() -> str:
    """An address of this host that other nodes can reach (best effort; MASTER_ADDR overrides it)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()


def _limit_cpu_threads(local_world_size: int) -> None:
    # N processes on one CPU node each default to all cores, which oversubscribes them badly.
    # torchrun sets OMP_NUM_THREADS=1 itself; respect any explicit user setting.
    if local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))


def _mpi_env_world_size() -> Optional[int]:
    """World size that the MPI launcher exported, or None when it exported none."""
    for name in _MPI_SIZE_VARS:
        size = _env_int(name)
        if size is not None:
            return size
    return None


def _import_mpi() -> Tuple[Any, Optional[str]]:
    """``(mpi4py.MPI, None)``, or ``(None, why not)`` when mpi4py is missing or cannot load libmpi."""
    try:
        from mpi4py import MPI  # lazy: plain runs must not need an MPI runtime
    except ImportError:
        return None, "mpi4py is not installed"
    except RuntimeError as err:  # mpi4py 4 raises RuntimeError("cannot load MPI library") without libmpi
        return None, f"mpi4py cannot load an MPI library ({str(err).splitlines()[0]})"
    return MPI, None


def _setup_mpi(backend: str) -> None:
    global _local_rank
    MPI, problem = _import_mpi()
    if MPI is None:
        world = _mpi_env_world_size()
        rank_var = next(v for v in _MPI_RANK_VARS if os.environ.get(v) is not None)
        if world == 1:
            return  # an MPI singleton: nothing to join
        raise LauncherError(
            f"an MPI launcher started this process ({rank_var}={os.environ[rank_var]}, world size "
            f"{world if world is not None else 'unknown'}) but {problem}: install mpi4py and an MPI library "
            "(pip install -e '.[mpi]' with your site's MPI, or '.[dev]' for mpich from PyPI), or launch "
            "with torchrun instead"
        )

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    _local_rank = node_comm.Get_rank()
    local_world = node_comm.Get_size()
    node_comm.Free()
    if world == 1:
        _limit_cpu_threads(1)
        return
    # All ranks on one host -> loopback, which always works; otherwise rank 0's address.
    hosts = comm.allgather(socket.gethostname())
    rendezvous = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else _host_address())
        port = os.environ.get("MASTER_PORT") or str(_free_port())
        rendezvous = (addr, port)
    addr, port = comm.bcast(rendezvous, root=0)
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = port
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world)
    os.environ["LOCAL_RANK"] = str(_local_rank)
    _limit_cpu_threads(local_world)
    _set_cuda_device()
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)


def _setup_torchrun(backend: str) -> None:
    global _local_rank
    world = _env_int("WORLD_SIZE") or 1
    _local_rank = _env_int("LOCAL_RANK") or 0
    if world == 1:
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"RANK/WORLD_SIZE are set (world size {world}) but {name} is not")
    _limit_cpu_threads(_env_int("LOCAL_WORLD_SIZE") or 1)
    _set_cuda_device()
    dist.init_process_group(backend=backend, init_method="env://")


def _set_cuda_device() -> None:
    if torch.cuda.is_available():
        torch.cuda.set_device(_local_rank % torch.cuda.device_count())


def setup_dist(backend: Optional[str] = None) -> None:
    """Join the process group of the current launcher (no-op for a plain single process or if already set up).

    Args:
        backend: torch.distributed backend; default ``nccl`` with CUDA, ``gloo`` without.

    Raises:
        LauncherError: under an MPI launcher with more than one rank (or an unknown count) when mpi4py is
            missing or cannot load libmpi.
    """
    global _launcher
    if dist.is_available() and dist.is_initialized():
        return
    _launcher = detect_launcher()
    backend = backend or _default_backend()
    if _launcher == "torchrun":
        _setup_torchrun(backend)
    elif _launcher == "mpi":
        _setup_mpi(backend)
    elif torch.cuda.is_available():
        _set_cuda_device()


def cleanup_dist() -> None:
    """Destroy the process group if one exists (call at the very end of a script)."""
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    """True when a torch.distributed process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """Rank of this process on its node; selects the CUDA device."""
    return _local_rank


def is_main_process() -> bool:
    """True on rank 0, the process that writes shared files (logs, checkpoints)."""
    return get_rank() == 0


def dev() -> torch.device:
    """The device for this process: ``cuda:<local rank>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", _local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo works with CPU tensors.
    if is_initialized() and dist.get_backend() == "nccl":
        return dev()
    return torch.device("cpu")


def barrier() -> None:
    """Wait for all ranks (no-op when not distributed)."""
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s (picklable) ``obj`` on every rank (identity when not distributed)."""
    if not is_initialized() or get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=_comm_device())
    return holder[0]


def all_gather_object(obj: Any) -> list:
    """List of every rank's (picklable) ``obj``, indexed by rank (``[obj]`` when not distributed)."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=None)
    return out


def _broadcast_bytes(data: Optional[bytes]) -> Optional[bytes]:
    """Send rank 0's bytes to every rank as two broadcasts (length, payload); None travels as length -1."""
    device = _comm_device()
    length = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    n = int(length.item())
    if n < 0:
        return None
    if get_rank() == 0:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        payload = torch.empty(n, dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=0)
    return data if get_rank() == 0 else payload.cpu().numpy().tobytes()


def load_state_dict(path: str, **kwargs: Any) -> Any:
    """Load a checkpoint that rank 0 reads from disk and broadcasts to the other ranks.

    Only one process touches the (possibly network) file system. ``kwargs`` go to ``torch.load``
    (default ``map_location="cpu"`` and ``weights_only=True``: our checkpoints hold only tensors and plain
    Python values).

    Raises:
        FileNotFoundError: on every rank if ``path`` is not a file on rank 0.
    """
    kwargs.setdefault("map_location", "cpu")
    kwargs.setdefault("weights_only", True)
    if not is_initialized() or get_world_size() == 1:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return torch.load(path, **kwargs)
    data = None
    if get_rank() == 0 and os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    data = _broadcast_bytes(data)
    if data is None:
        raise FileNotFoundError(f"checkpoint {path} does not exist (on rank 0)")
    return torch.load(io.BytesIO(data), **kwargs)


def sync_params(params: Iterable[torch.Tensor]) -> None:
    """Overwrite every rank's tensors with rank 0's (no-op when not distributed)."""
    if not is_initialized() or get_world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data if isinstance(p, torch.nn.Parameter) else p, src=0)
