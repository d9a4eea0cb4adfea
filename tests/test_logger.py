"""logger: upstream API, log.txt / progress.csv / progress.json, log directory, rank-0-only shared files."""

import csv
import os

import pytest

from improved_diffusion import logger


@pytest.fixture(autouse=True)
def _restore_logger():
    previous = logger.Logger.CURRENT
    yield
    if logger.Logger.CURRENT is not previous and logger.Logger.CURRENT is not None:
        logger.Logger.CURRENT.close()
    logger.Logger.CURRENT = previous


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_writes_log_txt_and_progress_csv(tmp_path):
    logger.configure(str(tmp_path), format_strs=["log", "csv", "json"])
    assert logger.get_dir() == str(tmp_path)
    logger.log("hello", 3)
    logger.logkv("step", 1)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 3.0)
    assert logger.dumpkvs() == {"step": 1, "loss": 2.0}
    logger.logkv("step", 2)
    logger.logkv_mean("loss", 4.0, n=3)  # weighted: the mean of 3 values
    logger.logkv_mean("loss", 0.0)
    logger.logkv("grad_norm", 0.5)  # a new key: the CSV gains a column
    logger.dumpkvs()

    text = (tmp_path / "log.txt").read_text()
    assert "hello 3" in text and "| loss" in text and "| grad_norm" in text
    rows = _rows(tmp_path / "progress.csv")
    assert rows[0] == ["loss", "step", "grad_norm"]
    assert rows[1] == ["2.0", "1", ""]
    assert rows[2] == ["3.0", "2", "0.5"]
    assert logger.read_json(str(tmp_path / "progress.json"))[1]["grad_norm"] == 0.5


def test_csv_continues_existing_table(tmp_path):
    logger.configure(str(tmp_path), format_strs=["csv"])
    logger.logkv("a", 1)
    logger.dumpkvs()
    logger.configure(str(tmp_path), format_strs=["csv"])  # e.g. a resumed run
    logger.logkv("a", 2)
    logger.logkv("b", 3)
    logger.dumpkvs()
    assert _rows(tmp_path / "progress.csv") == [["a", "b"], ["1", ""], ["2", "3"]]


def test_dir_from_env_and_default_formats(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "env_dir"))
    monkeypatch.delenv("OPENAI_LOG_FORMAT", raising=False)
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    logger.configure()
    logger.logkv("x", 1.5)
    logger.dumpkvs()
    out = tmp_path / "env_dir"
    assert logger.get_dir() == str(out)
    assert (out / "log.txt").exists() and (out / "progress.csv").exists()
    assert "| x" in capsys.readouterr().out


def test_temp_dir_when_nothing_given(monkeypatch):
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    logger.configure(format_strs=[])
    assert os.path.isdir(logger.get_dir())


def test_other_ranks_do_not_write_shared_files(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("OPENAI_LOG_FORMAT_MPI", raising=False)
    logger.configure(str(tmp_path))
    logger.log("from rank 1")
    logger.logkv("x", 1)
    logger.dumpkvs()
    assert sorted(os.listdir(tmp_path)) == ["log-rank001.txt"]


def test_bad_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown log format 'tensorboardx'"):
        logger.configure(str(tmp_path), format_strs=["tensorboardx"])
