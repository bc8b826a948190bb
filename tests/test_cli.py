"""Every script's --help shows the default of every option (cli.Parser), and cli's output checks
refuse by trying to write, not by os.access."""

import importlib
import re

import pytest

from machinery import cli

# each script's module and how its --help is asked for
SCRIPTS = ["train", "sample", "fid", "toy", "machinery.bench", "machinery.gpu_check", "beyond.train", "beyond.toy", "beyond.templates",
           "beyond.fashion", "beyond.classifier"]


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
