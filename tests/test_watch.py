"""Folder mode of live staining: files appearing one by one, some half-written, and Ctrl-C."""

from __future__ import annotations

import io as pyio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from _fake_predictor import FakePredictor, blobs
from napari_lcm_stain.engine import stain
from napari_lcm_stain.watch import watch_folder

TILE, OVERLAP, SETTLE = 128, 16, 0.6


def _tiff_bytes(a: np.ndarray) -> bytes:
    buf = pyio.BytesIO()
    tifffile.imwrite(buf, a)
    return buf.getvalue()


def _wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def watcher(tmp_path):
    """A watch on tmp_path/in in a background thread; yields (in, out, log lines)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    stop, lines, result = threading.Event(), [], {}

    def run():
        result["report"] = watch_folder(
            src, out, model=FakePredictor(), tile=TILE, overlap=OVERLAP, settle=SETTLE,
            poll=0.05, stop=stop, log=lines.append,
        )  # fmt: skip

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert _wait_for(lambda: any(line.startswith("watching") for line in lines))
    yield src, out, lines
    stop.set()
    thread.join(30)
    assert not thread.is_alive() and "report" in result  # stopped cleanly, with its report


def _expected(a: np.ndarray) -> np.ndarray:
    # a TIFF without a pixel size is stained at its estimated one, as `stain` does
    return stain(a, FakePredictor(), None, TILE, OVERLAP, "auto", 0, "auto")


def test_watch_stains_files_once_complete_and_survives_half_written_ones(watcher):
    src, out, lines = watcher
    a, b, c, d = (blobs((96, 96), seed=s) for s in range(4))

    (src / "a.tif").write_bytes(_tiff_bytes(a))  # written in one go
    (src / "notes.txt").write_text("not an image")  # ignored
    assert _wait_for(lambda: (out / "a_dapi.ome.tif").exists())
    np.testing.assert_allclose(tifffile.imread(out / "a_dapi.ome.tif"), _expected(a), atol=1e-6)

    data = _tiff_bytes(b)  # written in two parts with a pause shorter than the settle time
    with open(src / "b.tif", "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(SETTLE / 2)
        assert not (out / "b_dapi.ome.tif").exists()  # not stained half-written
        f.write(data[len(data) // 2 :])
    assert _wait_for(lambda: (out / "b_dapi.ome.tif").exists())
    np.testing.assert_allclose(tifffile.imread(out / "b_dapi.ome.tif"), _expected(b), atol=1e-6)

    data = _tiff_bytes(c)  # the writer stalls longer than the settle time: a note, no output
    (src / "c.tif").write_bytes(data[: int(len(data) * 0.6)])
    assert _wait_for(lambda: any("c.tif: not stained" in line for line in lines))
    assert not (out / "c_dapi.ome.tif").exists()

    (src / ".d.tif.part").write_bytes(_tiff_bytes(d))  # an atomic rename into the folder
    os.replace(src / ".d.tif.part", src / "d.tif")
    assert _wait_for(lambda: (out / "d_dapi.ome.tif").exists())

    with open(src / "c.tif", "ab") as f:  # ... and when the stalled file is finished, it is stained
        f.write(data[int(len(data) * 0.6) :])
    assert _wait_for(lambda: (out / "c_dapi.ome.tif").exists())
    np.testing.assert_allclose(tifffile.imread(out / "c_dapi.ome.tif"), _expected(c), atol=1e-6)

    assert sorted(p.name for p in out.iterdir()) == [
        f"{n}_dapi.ome.tif" for n in "abcd"
    ]  # no temporary or half-written output left
    wrote = [line for line in lines if line.startswith("wrote")]
    assert len(wrote) == 4 and all("s after" in line for line in wrote)


def test_watch_refuses_a_missing_folder_or_writing_into_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="watch folder .* not found"):
        watch_folder(tmp_path / "nope", tmp_path / "out", model=FakePredictor())
    with pytest.raises(ValueError, match="is the watched folder: choose another -o"):
        watch_folder(tmp_path, tmp_path, model=FakePredictor())


def test_cli_watch_stains_a_new_file_and_stops_cleanly_on_ctrl_c(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "napari_lcm_stain.cli", "watch", str(src), "-o", str(out)]
    proc = subprocess.Popen(
        cmd + ["--device", "cpu", "--tile", "128", "--settle", "0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a child inherits an ignored SIGINT (an earlier test in this process may leave one)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout.readline().startswith("watching"), proc.stderr.read()
        (src / "field.tif").write_bytes(_tiff_bytes(blobs((64, 64), seed=1)))
        assert proc.stdout.readline().startswith("wrote")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopped: 1 file(s) stained, 0 not stained" in stdout
    assert "Traceback" not in stderr
    assert [p.name for p in out.iterdir()] == ["field_dapi.ome.tif"]


def test_watch_module_is_core_and_the_cli_lists_it(capsys):
    import ast

    import napari_lcm_stain.watch as watch
    from napari_lcm_stain.cli import main

    tree = ast.parse(Path(watch.__file__).read_text())
    tops = {
        (n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    } | {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not tops & {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui"}
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "watch" in capsys.readouterr().out


def test_watch_existing_files_only_when_asked(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "before.tif").write_bytes(_tiff_bytes(blobs((64, 64), seed=9)))
    for existing, expected in ((False, []), (True, ["before_dapi.ome.tif"])):
        out, stop = tmp_path / f"out-{existing}", threading.Event()
        timer = threading.Timer(2.0, stop.set)  # well past the settle time
        timer.start()
        report = watch_folder(
            src, out, model=FakePredictor(), tile=TILE, overlap=OVERLAP, settle=0.2, poll=0.05,
            existing=existing, stop=stop, log=lambda _line: None,
        )  # fmt: skip
        timer.join()
        assert sorted(p.name for p in out.iterdir()) == expected
        assert [p.name for p in report.written] == expected and not report.notes
