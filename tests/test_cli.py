"""Every script's --help shows the default of every option (cli.Parser), cli's output checks
refuse by trying to write, not by os.access, and --threads 0 takes the cores left idle."""

import importlib
import re
import subprocess
import sys
import time

import pytest

from machinery import cli

# each script's module and how its --help is asked for
SCRIPTS = ["train", "sample", "fid", "toy", "machinery.bench", "machinery.gpu_check", "beyond.train", "beyond.toy",
           "beyond.templates", "beyond.fashion", "beyond.classifier"]


def help_text(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def option_blocks(text):
    """{first flag: its help text} of an argparse --help."""
    options = text.split("options:")[1]
    blocks = re.split(r"\n  (?=-)", "\n" + options)
    return {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks if b.strip().startswith("-")}


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_every_default(name, capsys):
    blocks = option_blocks(help_text(name, capsys))
    missing = [flag for flag, text in blocks.items() if flag != "-h" and "default" not in text]
    assert len(blocks) > 3 and not missing, missing


def test_output_file_tries_to_write(tmp_path, capsys):
    cli.output_file("x.py", str(tmp_path / "ok.png"), "--png", exts=(".png",))   # passes, and leaves nothing
    assert list(tmp_path.iterdir()) == []
    for path, says in [("/proc/a.png", "cannot write in /proc"), (str(tmp_path / "a.gif"), "end the name in .png"),
                       (str(tmp_path / "no" / "a.png"), "does not exist")]:
        with pytest.raises(SystemExit) as e:
            cli.output_file("x.py", path, "--png", exts=(".png",))
        assert e.value.code == 2 and says in capsys.readouterr().err
    (tmp_path / "a.png").write_text("kept")
    with pytest.raises(SystemExit):
        cli.output_file("x.py", str(tmp_path / "a.png"), "--png", exts=(".png",))
    assert "exists: pass --force" in capsys.readouterr().err
    cli.output_file("x.py", str(tmp_path / "a.png"), "--png", force=True, exts=(".png",))
    with pytest.raises(SystemExit):
        cli.output_dir("x.py", "/proc/run", "--out-dir")
    assert "cannot write in /proc" in capsys.readouterr().err


@pytest.mark.parametrize("busy, cores, ranks, want", [(0.1, 2, 1, 2), (1.2, 2, 1, 1), (2.0, 2, 1, 1), (6.0, 8, 2, 4),
                                                       (5.4, 8, 1, 3)])
def test_threads_are_the_cores_left_idle(busy, cores, ranks, want, monkeypatch):
    """--threads 0: torch's one thread per core, less the cores other processes keep busy (the rule
    measured in docs/performance.md); under torchrun the cores shared among a machine's ranks,
    whatever is busy (the ranks themselves); --threads N: N."""
    chosen = []
    monkeypatch.setattr(cli, "busy_cores", lambda: busy)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(cli.torch, "get_num_threads", lambda: cores)
    monkeypatch.setattr(cli.torch, "set_num_threads", chosen.append)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert cli.set_threads(0) == want and cli.set_threads(3) == 3 and chosen == [want, 3]


def test_busy_cores_sees_a_busy_process():
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert cli.busy_cores(0.5) >= 0.6
    finally:
        p.kill()
        p.wait()
