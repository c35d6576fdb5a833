"""Issue 25, items 5, 6, 7 and 20: `watch` on SIGTERM, files that land while it starts, settings
checked at startup, and argument errors refused before torch is imported."""

from __future__ import annotations

import os
import shlex
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
from napari_lcm_stain.watch import watch_folder
from test_watch import _tiff_bytes

SRC = str(Path(__file__).parents[1] / "src")


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "napari_lcm_stain.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw,
    )  # fmt: skip


def test_watch_sigterm_exits_143_and_prints_the_command_that_stains_the_queued_files(tmp_path):
    """Item 5: SIGTERM with files still waiting to settle: exit 143, the count, and a command
    that stains exactly those files."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    settle = "4"  # the first file is stained; the later ones are still settling at SIGTERM
    proc = _cli("watch", str(src), "-o", str(out), "--device", "cpu", "--tile", "128",
                "--settle", settle, "--seed", "7", "--pixel-size", "0.414")  # fmt: skip
    try:
        assert proc.stdout.readline().startswith("watching"), proc.stderr.read()
        (src / "first.tif").write_bytes(_tiff_bytes(blobs((64, 64), seed=1)))
        assert proc.stdout.readline().startswith("wrote"), proc.stderr.read()
        queued = [f"f{i} [x].tif" for i in range(5)]  # a space and glob characters: quoted
        for i, name in enumerate(queued):
            (src / name).write_bytes(_tiff_bytes(blobs((64, 64), seed=10 + i)))
        time.sleep(1.0)  # the file events arrive; well short of the settle time
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert "terminated (SIGTERM)" in stderr
    assert "stopped: 1 file(s) stained, 0 not stained, 5 still queued" in stdout
    assert [p.name for p in out.iterdir()] == ["first_dapi.ome.tif"]
    command = next(line for line in stdout.splitlines() if line.strip().startswith("lcm-stain "))
    argv = shlex.split(command)
    assert argv[:2] == ["lcm-stain", "stain"]
    assert argv[argv.index("--seed") + 1] == "7" and argv[argv.index("--tile") + 1] == "128"
    from napari_lcm_stain.cli import main

    assert main(argv[1:]) == 0  # the printed command stains exactly the queued files
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["first_dapi.ome.tif"] + [n[:-4] + "_dapi.ome.tif" for n in queued]
    )


def test_watch_interrupted_mid_batch_counts_the_rest_as_queued(tmp_path):
    """Item 5, in process: the file being stained and the rest of its batch are queued too."""
    from napari_lcm_stain.cli import Terminated

    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.tif").write_bytes(_tiff_bytes(blobs((64, 64), seed=i)))
    lines: list[str] = []

    def on_written(path, written):
        raise Terminated  # SIGTERM right after the first file

    with pytest.raises(Terminated):
        watch_folder(
            src, tmp_path / "out", model=FakePredictor(), tile=128, overlap=16, settle=0.1,
            poll=0.05, existing=True, log=lines.append, on_written=on_written, pixel_size=0.25,
        )  # fmt: skip
    assert "stopped: 1 file(s) stained, 0 not stained, 3 still queued" in lines
    command = lines[-1]
    assert command.startswith("  lcm-stain stain ")
    assert all(str(src / f"{i}.tif") in command for i in (1, 2, 3)) and "0.tif" not in command


def test_watch_stains_a_file_that_lands_while_the_model_loads(tmp_path, monkeypatch):
    """Item 6: model loading takes seconds; a file written meanwhile is stained."""
    import napari_lcm_stain.engine as engine

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()

    def slow_load(model, *args, **kwargs):
        if not isinstance(model, str):  # stain_files passes the loaded predictor through
            return model
        (src / "early.tif").write_bytes(_tiff_bytes(blobs((64, 64), seed=3)))
        time.sleep(0.5)
        return FakePredictor()

    monkeypatch.setattr(engine, "get_predictor", slow_load)
    stop = threading.Event()
    threading.Timer(3.0, stop.set).start()
    report = watch_folder(
        src, out, model="lcm", tile=128, overlap=16, settle=0.2, poll=0.05, stop=stop,
        log=lambda _line: None, pixel_size=0.25,
    )  # fmt: skip
    assert [p.name for p in report.written] == ["early_dapi.ome.tif"]


def test_watch_stains_files_written_since_launch_but_not_older_ones(tmp_path):
    """Item 6: the CLI passes its launch time; files newer than it (written while torch was
    imported, before the watch began) are stained without --existing, older ones are not."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "old.tif").write_bytes(_tiff_bytes(blobs((64, 64), seed=1)))
    old = time.time() - 60
    os.utime(src / "old.tif", (old, old))
    launched = time.time() - 5
    (src / "new.tif").write_bytes(_tiff_bytes(blobs((64, 64), seed=2)))
    stop = threading.Event()
    threading.Timer(2.0, stop.set).start()
    report = watch_folder(
        src, out, model=FakePredictor(), tile=128, overlap=16, settle=0.2, poll=0.05, stop=stop,
        log=lambda _line: None, since=launched, pixel_size=0.25,
    )  # fmt: skip
    assert [p.name for p in report.written] == ["new_dapi.ome.tif"]


BAD_SETTINGS = [
    ({"tile": 0}, "tile must be an integer >= 1"),
    ({"overlap": -5}, "overlap must be an integer >= 0"),
    ({"pixel_size": -1.0}, "pixel_size must be a positive number"),
    ({"seed": 2**64}, "seed .* is out of range"),
    ({"pixel_size": 414.0}, "pixel size 414 µm/px .* outside the supported"),
    ({"steps": 0}, "steps must be a positive integer"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_SETTINGS)
def test_watch_refuses_bad_settings_before_loading_the_model(tmp_path, monkeypatch, bad, message):
    """Item 7: a bad setting is refused at startup (it used to fail every file forever)."""
    import napari_lcm_stain.engine as engine

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(engine, "get_predictor", no_load)
    (tmp_path / "in").mkdir()
    settings = {"tile": 128, "overlap": 16, "seed": 0, "pixel_size": None, **bad}
    with pytest.raises(ValueError, match=message):
        watch_folder(tmp_path / "in", tmp_path / "out", model="lcm", **settings)
    assert not (tmp_path / "out").exists()  # nothing created


def test_watch_refuses_an_overlap_that_leaves_no_stride_once_the_model_is_known(tmp_path):
    """Item 7: the tile-grid check `stain` makes after loading the model runs at startup too."""
    (tmp_path / "in").mkdir()
    stop = threading.Event()
    threading.Timer(3.0, stop.set).start()  # without the check, the watch would just run
    with pytest.raises(ValueError, match="overlap 4096 leaves no stride"):
        watch_folder(tmp_path / "in", tmp_path / "out", model=FakePredictor(), tile=16,
                     overlap=4096, stop=stop, log=lambda _line: None)  # fmt: skip


# Item 20: refusals that need no model come before torch (and scipy) are imported.
_PROBE = """
import sys
from napari_lcm_stain.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "scipy") if m in sys.modules)
print("RC", rc, "HEAVY", ",".join(heavy) or "-")
"""


def _probe(tmp_path, *args) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    return done.stdout.strip().splitlines()[-1], done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stain", "q.tif", "-o", "o.tif", "--pixel-size", "414"], "pixel size 414 µm/px"),
        (["stain", "q.tif", "-o", "o.tif", "--tile", "0"], "tile must be an integer >= 1"),
        (["stain", "q.tif", "-o", "o.tif", "--seed", str(2**64)], "out of range"),
        (["stain", "missing.tif", "-o", "o.tif"], "input not found"),
        (["stain", "q.tif", "-o", "exists.ome.tif"], "exists: pass --overwrite"),
        (["watch", "in", "-o", "out", "--overlap", "-5"], "overlap must be an integer >= 0"),
        (["watch", "in", "-o", "out", "--pixel-size", "414"], "pixel size 414 µm/px"),
        (["watch", "nope", "-o", "out"], "watch folder nope not found"),
    ],
)
def test_argument_errors_are_refused_before_torch_is_imported(tmp_path, args, message):
    tifffile.imwrite(tmp_path / "q.tif", np.random.default_rng(0).random((32, 32), np.float32))
    (tmp_path / "exists.ome.tif").write_bytes(b"")
    (tmp_path / "in").mkdir()
    last, stderr = _probe(tmp_path, *args)
    assert last == "RC 2 HEAVY -", (last, stderr)
    assert message in stderr, stderr


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_dock_makes_openmp_threads_sleep_unless_the_user_chose(given, expected):
    """Item 21 (measured in docs/engine.md): the docks' jobs module sets OMP_WAIT_POLICY before
    torch loads; a policy the user set wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({"PYTHONPATH": SRC, **({"OMP_WAIT_POLICY": given} if given else {})})
    code = (
        "import os, sys; import napari_lcm_stain._widgets._jobs; "
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.split() == [expected, "False"], done.stderr


def test_dock_watch_stains_a_file_that_lands_while_the_model_loads(tmp_path, monkeypatch):
    """The dock's Watch folder… loads the model before watching: a file written meanwhile is
    stained (it is newer than the job's start)."""
    import threading
    import time

    import numpy as np
    import tifffile

    from _fake_predictor import FakePredictor
    from napari_lcm_stain._drain import drain
    from napari_lcm_stain._widgets import _jobs

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    meta = {"axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}

    def slow_load(cache, model, steps, device, texture=False, guidance=None):
        tifffile.imwrite(src / "early.tif", np.random.default_rng(0).random((64, 64), np.float32),
                         ome=True, metadata=meta)  # fmt: skip
        time.sleep(0.3)
        return FakePredictor()

    monkeypatch.setattr(_jobs, "get_predictor", slow_load)
    stop = threading.Event()
    timer = threading.Timer(3.0, stop.set)
    timer.start()
    report = drain(_jobs.watch_job(src, out, stop, model="lcm", cache={}, settle=0.2, poll=0.05,
                                   tile=64, overlap=0, device="cpu"))  # fmt: skip
    timer.join()
    assert [p.name for p in report.written] == ["early_dapi.ome.tif"], report.notes
