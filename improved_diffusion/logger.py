"""Key-value and text logging with upstream improved-diffusion's (OpenAI baselines') API.

Usage: ``configure(dir)`` once, then ``log(...)`` for text and ``logkv`` / ``logkv_mean`` + ``dumpkvs()`` for
tables. Output formats (``format_strs``, or ``OPENAI_LOG_FORMAT`` = comma list, default ``stdout,log,csv``):

- ``stdout``: a table per dump on standard output; ``log``: the same in ``<dir>/log.txt``;
- ``csv``: one row per dump in ``<dir>/progress.csv`` (rewritten with an extra column when a new key appears);
- ``json``: one JSON object per dump in ``<dir>/progress.json``.

The directory is ``dir``, else ``OPENAI_LOGDIR``, else a new time-stamped folder under the temp dir.
Only rank 0 writes the shared files; other ranks write just ``log-rank<r>.txt`` (``OPENAI_LOG_FORMAT_MPI``,
default ``log``). Key values are rank-local (the training loop logs rank 0's), as upstream.
"""

import csv
import datetime
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Dict, Iterable, List, Optional, TextIO

from .io_util import atomic_write

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50


class KVWriter:
    """Something that writes a dict of key-value pairs (one dump)."""

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SeqWriter:
    """Something that writes free text lines."""

    def writeseq(self, seq: Iterable[Any]) -> None:
        raise NotImplementedError


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:<8.3g}"
    return str(value)


class HumanOutputFormat(KVWriter, SeqWriter):
    """A boxed two-column table per dump, and text lines, to a file path or an open stream."""

    def __init__(self, filename_or_file: Any) -> None:
        if isinstance(filename_or_file, str):
            self.file: TextIO = open(filename_or_file, "a", encoding="utf-8")
            self.own_file = True
        else:
            self.file = filename_or_file
            self.own_file = False

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        if not kvs:
            return
        rows = [(self._truncate(k), self._truncate(_fmt(v))) for k, v in sorted(kvs.items())]
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        line = "-" * (kw + vw + 7)
        lines = (
            [line] + [f"| {k}{' ' * (kw - len(k))} | {v}{' ' * (vw - len(v))} |" for k, v in rows] + [line]
        )
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    @staticmethod
    def _truncate(s: str) -> str:
        return s[:27] + "..." if len(s) > 30 else s

    def writeseq(self, seq: Iterable[Any]) -> None:
        self.file.write(" ".join(str(s) for s in seq) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.own_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per line and dump."""

    def __init__(self, filename: str) -> None:
        self.file = open(filename, "a", encoding="utf-8")

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in kvs.items()}
        self.file.write(json.dumps(clean, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CSVOutputFormat(KVWriter):
    """A CSV table; when a new key appears, the file is rewritten (atomically) with the extra column."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.keys: List[str] = []
        if os.path.isfile(filename) and os.path.getsize(filename) > 0:
            # Appending to an existing table (e.g. after resume): continue with its columns.
            with open(filename, newline="", encoding="utf-8") as f:
                self.keys = next(csv.reader(f), [])

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        new_keys = sorted(k for k in kvs if k not in self.keys)
        if new_keys:
            self._rewrite_with(self.keys + new_keys)
        with open(self.filename, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if os.path.getsize(self.filename) == 0:
                writer.writerow(self.keys)
            writer.writerow(["" if kvs.get(k) is None else kvs[k] for k in self.keys])

    def _rewrite_with(self, keys: List[str]) -> None:
        rows: List[List[str]] = []
        if os.path.isfile(self.filename) and os.path.getsize(self.filename) > 0:
            with open(self.filename, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))[1:]
        pad = len(keys) - len(self.keys)

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(keys)
                writer.writerows(row + [""] * pad for row in rows)

        atomic_write(self.filename, write)
        self.keys = keys


def make_output_format(fmt: str, ev_dir: str, log_suffix: str = "") -> KVWriter:
    """Create the writer named ``fmt`` (stdout, log, json, csv) inside ``ev_dir``."""
    os.makedirs(ev_dir, exist_ok=True)
    if fmt == "stdout":
        return HumanOutputFormat(sys.stdout)
    if fmt == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if fmt == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if fmt == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    raise ValueError(f"unknown log format {fmt!r} (expected stdout, log, json or csv)")


class Logger:
    """Holds the current key-value row and the output writers."""

    def __init__(self, dir: Optional[str], output_formats: List[KVWriter]) -> None:
        self.name2val: Dict[str, Any] = defaultdict(float)
        self.name2cnt: Dict[str, float] = defaultdict(float)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats

    def logkv(self, key: str, val: Any) -> None:
        self.name2val[key] = val

    def logkv_mean(self, key: str, val: Any, n: float = 1) -> None:
        """Running mean over calls since the last dump; ``n`` weights ``val`` as the mean of n values."""
        if n <= 0:
            return
        old, cnt = self.name2val[key], self.name2cnt[key]
        self.name2val[key] = old * cnt / (cnt + n) + float(val) * n / (cnt + n)
        self.name2cnt[key] = cnt + n

    def dumpkvs(self) -> Dict[str, Any]:
        out = dict(self.name2val)
        if self.level < DISABLED:
            for fmt in self.output_formats:
                fmt.writekvs(out)
        self.name2val.clear()
        self.name2cnt.clear()
        return out

    def log(self, *args: Any, level: int = INFO) -> None:
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, SeqWriter):
                    fmt.writeseq(map(str, args))

    def set_level(self, level: int) -> None:
        self.level = level

    def get_dir(self) -> Optional[str]:
        return self.dir

    def close(self) -> None:
        for fmt in self.output_formats:
            fmt.close()


def _rank_from_env() -> int:
    """This process's rank without importing mpi4py (torch.distributed if set up, else launcher env vars)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is always installed here
        pass
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    return 0


Logger.CURRENT: Optional[Logger] = None  # type: ignore[attr-defined]
Logger.DEFAULT: Optional[Logger] = None  # type: ignore[attr-defined]


def configure(
    dir: Optional[str] = None,
    format_strs: Optional[List[str]] = None,
    comm: Any = None,
    log_suffix: str = "",
) -> None:
    """Start logging into ``dir`` (else ``OPENAI_LOGDIR``, else a new temp folder).

    Args:
        dir: log directory, created if missing.
        format_strs: writers to use (see module docstring); default from the environment.
        comm: accepted for upstream compatibility; must be None (values are not averaged across ranks).
        log_suffix: appended to the file names (``log<suffix>.txt``); ranks > 0 add ``-rank<r>``.
    """
    if comm is not None:
        raise ValueError("logger.configure: averaging key values over an MPI communicator is not supported")
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR")
    if dir is None:
        stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        dir = os.path.join(tempfile.gettempdir(), stamp)
    dir = os.path.expanduser(dir)
    os.makedirs(dir, exist_ok=True)
    rank = _rank_from_env()
    if rank > 0:
        log_suffix = f"{log_suffix}-rank{rank:03d}"
    if format_strs is None:
        env = (
            os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv")
            if rank == 0
            else os.getenv("OPENAI_LOG_FORMAT_MPI", "log")
        )
        format_strs = [f for f in env.split(",") if f]
    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
    Logger.CURRENT = Logger(
        dir=dir, output_formats=[make_output_format(f, dir, log_suffix) for f in format_strs]
    )
    if format_strs:
        log(f"Logging to {dir}")


def _configure_default_logger() -> None:
    Logger.CURRENT = Logger(dir=None, output_formats=[HumanOutputFormat(sys.stdout)])
    Logger.DEFAULT = Logger.CURRENT


def get_current() -> Logger:
    """The active logger (a stdout-only one until :func:`configure` is called)."""
    if Logger.CURRENT is None:
        _configure_default_logger()
    return Logger.CURRENT


def reset() -> None:
    """Close the configured logger and fall back to the stdout-only default."""
    if Logger.CURRENT is not Logger.DEFAULT and Logger.CURRENT is not None:
        Logger.CURRENT.close()
    Logger.CURRENT = Logger.DEFAULT
    log("Reset logger")


@contextmanager
def scoped_configure(dir: Optional[str] = None, format_strs: Optional[List[str]] = None):
    """Log into ``dir`` inside the ``with`` block, then restore the previous logger."""
    prev = Logger.CURRENT
    configure(dir=dir, format_strs=format_strs)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = prev


def logkv(key: str, val: Any) -> None:
    """Set ``key`` to ``val`` in the current row (the last value before a dump wins)."""
    get_current().logkv(key, val)


def logkv_mean(key: str, val: Any, n: float = 1) -> None:
    """Average ``val`` into ``key`` over calls until the next dump (``n``: weight, for a mean of n values)."""
    get_current().logkv_mean(key, val, n)


def logkvs(d: Dict[str, Any]) -> None:
    """:func:`logkv` for every item of ``d``."""
    for k, v in d.items():
        logkv(k, v)


def dumpkvs() -> Dict[str, Any]:
    """Write the current row to every output and clear it; returns the row."""
    return get_current().dumpkvs()


def getkvs() -> Dict[str, Any]:
    """The current (not yet dumped) row."""
    return get_current().name2val


def log(*args: Any, level: int = INFO) -> None:
    """Write a text line (arguments joined by spaces) to stdout/log.txt."""
    get_current().log(*args, level=level)


def debug(*args: Any) -> None:
    log(*args, level=DEBUG)


def info(*args: Any) -> None:
    log(*args, level=INFO)


def warn(*args: Any) -> None:
    log(*args, level=WARN)


def error(*args: Any) -> None:
    log(*args, level=ERROR)


def set_level(level: int) -> None:
    """Drop text lines below ``level`` (and all key values at DISABLED)."""
    get_current().set_level(level)


def get_dir() -> Optional[str]:
    """The log directory, or None when :func:`configure` has not been called."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename: str):
    """Add the wall time spent in the block to key ``wait_<scopename>``."""
    logkey = "wait_" + scopename
    start = time.time()
    try:
        yield
    finally:
        get_current().name2val[logkey] += time.time() - start


def read_csv(fname: str) -> List[Dict[str, str]]:
    """Rows of a progress.csv as dicts (strings)."""
    with open(fname, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_json(fname: str) -> List[Dict[str, Any]]:
    """Rows of a progress.json as dicts."""
    with open(fname, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
