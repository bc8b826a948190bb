"""machinery/gpu_check.py's CPU rehearsal: the one command of a CUDA machine, with --tiny, on fake
Fashion-MNIST: every part runs and reports (test_cuda's tests skip), the JSON and the one
Markdown table have their shape; a part past its deadline is killed and recorded while the run
goes on; the table pastes into a doc between its markers; bad flags are refused in one line."""

import gzip
import json
import os
import re
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from machinery import gpu_check

PARTS = ["environment", *gpu_check.PARTS]


def write_idx(path, array):
    """An IDX file (MNIST's format), gzipped, as torchvision leaves it."""
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (32, 28, 28), dtype=np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 32, dtype=np.uint8))
    return str(tmp_path / "data")


def table_rows(md):
    """The Markdown table's data rows as lists of cells (| inside a cell is escaped as \\|)."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert lines[0] == "| part | measurement | result | status | device | torch | command |"
    assert lines[1] == "| --- | --- | --- | --- | --- | --- | --- |"
    rows = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]
    assert all(len(r) == 7 for r in rows), rows
    return rows


def test_the_tiny_rehearsal_runs_every_part(tmp_path, fashion_dir):
    out = tmp_path / "out"
    # as on a GPU machine without the FID weights: fid.py's value is skipped (and 6 s of a 2-vCPU machine saved)
    gpu_check.main(["--out", str(out), "--tiny", "--data-dir", fashion_dir, "--fid-weights", "none"])
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"] == "CPU" and report["torch"] == torch.__version__ and report["tiny"]
    parts = {p["part"]: p for p in report["parts"]}
    assert [p["part"] for p in report["parts"]] == PARTS
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(PARTS, "ok"), \
        (out / "gpu_check.log").read_text()[-3000:]
    assert all(p["rows"] and p["command"].startswith("python ") for p in report["parts"])
    assert sum(p["budget_s"] for p in report["parts"]) == sum(gpu_check.TINY_BUDGET_S.values())

    tests = parts["test_cuda"]["results"]["tests"]      # without CUDA every test skips, each one named
    assert len(tests) >= 8 and all(t["outcome"] == "skipped" and t["s"] is not None for t in tests.values())
    rows = parts["bench"]["results"]["rows"]
    assert [(r["task"], r["smd"]) for r in rows] == [("train step", False), ("train step", True),
                                                     ("sample step", False), ("sample step", True)]
    assert all(r["ms"] > 0 and r["first_s"] > 0 and r["gflops"] > 0 for r in rows)
    train = parts["train"]
    stops = [result for what, result, _ in train["rows"] if what in ("SIGTERM", "resume")]
    step = int(re.fullmatch(r"stopped at step (\d+) with a checkpoint, exit 143", stops[0]).group(1))
    assert step >= gpu_check.TRAIN_WINDOWS     # SIGTERM after that many progress lines; a step may be under way
    assert stops[1] == f"resumed at step {step}, trained to step {step + gpu_check.RESUME_WINDOWS}, exit 0"
    assert train["results"]["img_s"] > 0 and 0 < train["results"]["loss"] < 10
    sample = parts["sample"]["results"]
    assert {s: (r["shape"], r["img_s"] > 0) for s, r in sample.items()} == {
        "ddpm": ([8, 32, 32, 1], True), "ddim": ([8, 32, 32, 1], True)}
    assert parts["fid"]["results"]["img_s"]["fid.py"] > 0
    assert parts["fid"]["rows"][-1][1].startswith("skipped: no FID weights here")

    md = (out / "gpu_check.md").read_text()
    assert md.startswith(f"Measured by `{report['command']}` on CPU (torch {torch.__version__}")
    rows = table_rows(md)
    assert sorted({r[0] for r in rows}) == sorted(PARTS)
    assert len(rows) == sum(len(p["rows"]) for p in report["parts"])
    for part, what, result, status, device, version, command in rows:
        assert what and result and status.split()[0] == parts[part]["status"], (part, what, status)
        assert device == "CPU" and version == torch.__version__ and re.fullmatch(r"`python \S+\.py .*`|"
                                                                                 r"`python -m (machinery\.bench|machinery\.gpu_check|pytest) .*`",
                                                                                 command)
    assert "$WORK" in md and report["work"] not in md     # the temporary folder is named once, in the JSON,
    assert not os.path.exists(report["work"])            # and removed at the end


def test_the_gpu_sizes_are_flags_the_scripts_take():
    """The tiny rehearsal runs the --tiny flag lists; the GPU's are checked here, by the scripts' parsers."""
    from machinery import bench
    import sample
    import train
    train.get_parser().parse_args(["--dataset", "fashion-mnist", "--smd", *gpu_check.TRAIN[0]])
    sample.get_parser().parse_args(gpu_check.SAMPLE[0])
    assert bench.parse_args([*gpu_check.BENCH[0], "--tasks", "train,sample"]).batch_size == 128
    assert bench.parse_args(["--tasks", "fid", "--fid-weights", "random", *gpu_check.FID_SPEED[0]]).fid_images == 2000


def test_a_part_past_its_deadline_is_killed_and_the_run_goes_on(tmp_path, fashion_dir):
    out = tmp_path / "out"
    report = gpu_check.main(["--out", str(out), "--tiny", "--data-dir", fashion_dir, "--parts", "bench,sample",
                             "--scale", "0.02"])   # 1.2 s each: not even enough to import torch
    parts = {p["part"]: p for p in json.loads((out / "gpu_check.json").read_text())["parts"]}
    assert parts["bench"]["status"] == "timeout" and parts["bench"]["wall_s"] < 10
    assert parts["sample"]["status"] == "skipped"    # no checkpoint: the train part did not run
    assert parts["sample"]["rows"] == [["checkpoint", "the train part wrote none", None]]
    assert "stopped at its deadline" in (out / "gpu_check.log").read_text()
    assert [p["part"] for p in report["parts"]] == ["environment", "bench", "sample"]


def test_sigterm_stops_the_part_and_writes_what_was_measured(tmp_path, fashion_dir):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "machinery.gpu_check", "--out", str(out), "--tiny", "--data-dir", fashion_dir,
                          "--parts", "bench"], cwd=gpu_check.ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert "bench (until" in next(line for line in p.stdout if "bench (until" in line)   # the part has started
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 143
    report = json.loads((out / "gpu_check.json").read_text())
    assert [part["part"] for part in report["parts"]] == ["environment"] and not os.path.exists(report["work"])


def test_fid_between_two_fashion_halves_when_weights_are_here(tmp_path, fashion_dir, fid_weights):
    args = gpu_check.parse_args(["--out", str(tmp_path), "--tiny", "--data-dir", fashion_dir, "--fid-weights", fid_weights])
    args.work = str(tmp_path)
    ctx = gpu_check.Context(args)
    ctx.deadline = gpu_check.time.time() + 60
    (what, result, command), = gpu_check.fid_halves(ctx)[0]
    assert what == "fid.py, Fashion-MNIST training images 0-1 vs 2-3" and command.startswith("python fid.py $WORK/")
    assert re.fullmatch(r"FID \d+\.\d{3} \(N=2 each; \d+ s\)", result), result
    ctx.fid_weights = None
    assert gpu_check.fid_halves(ctx)[0][0][1].startswith("skipped: no FID weights here")


def test_the_table_goes_into_a_doc_between_its_markers(tmp_path, capsys):
    report = dict(command="python gpu_check.py --out x", device="NVIDIA H100 80GB HBM3", torch="2.11.0", wall_s=400,
                  started="2026-01-01", parts=[dict(part="bench", status="ok", budget_s=180, wall_s=150,
                                                    command="python bench.py", rows=[["a | b", "1 ms", None]])])
    (tmp_path / "r.json").write_text(json.dumps(report))
    doc = tmp_path / "doc.md"
    doc.write_text(f"# head\n{gpu_check.MARKERS[0]}\nold table\n{gpu_check.MARKERS[1]}\ntail\n")
    gpu_check.main(["--table", str(tmp_path / "r.json"), "--into", str(doc)])
    text = doc.read_text()
    assert text.startswith(f"# head\n{gpu_check.MARKERS[0]}\nMeasured by `python gpu_check.py --out x` on NVIDIA H100")
    assert text.endswith(f"{gpu_check.MARKERS[1]}\ntail\n") and "old table" not in text
    assert table_rows(text) == [["bench", "a | b", "1 ms", "ok (150 of 180 s)", "NVIDIA H100 80GB HBM3", "2.11.0",
                                 "`python bench.py`"]]
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--table", str(tmp_path / "r.json"), "--into", str(doc)])
    assert e.value.code == 2 and "needs one line <!-- gpu_check:begin -->" in capsys.readouterr().err


BAD_FLAGS = [  # (argv, {t} standing for a temporary folder; what the one line says)
    ([], r"give --out DIR \(a run\) or --table JSON \(the table of a run\)$"),
    (["--out", "{t}", "--table", "{t}/f"], "not both"),
    (["--out", "{t}", "--into", "{t}/f"], "--into DOC goes with --table JSON"),
    (["--out", "{t}", "--parts", "bench,gpu"], "--parts: 'bench,gpu': use a comma-separated list of bench, train"),
    (["--out", "{t}", "--scale", "0"], "--scale: 0 is out of range"),
    (["--out", "{t}/f"], "--out .*/f is a file, not a folder"),
    (["--out", "{t}", "--fid-weights", "{t}/w.pt"], "--fid-weights .*/w.pt: no such file"),
    (["--out", "{t}/old"], "holds an earlier run's gpu_check files: pass --force"),
    (["--table", "{t}/r.json"], "--table .*/r.json: no such file"),
    (["--table", "{t}/f", "--into", "{t}/d.md"], "--into .*/d.md: no such file"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(argv) for argv, _ in BAD_FLAGS])
def test_bad_flags_are_refused_in_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "Context", None)   # nothing may start before the flags are checked
    (tmp_path / "f").write_text("")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "gpu_check.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        gpu_check.main([a.format(t=tmp_path) for a in argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.count("\n") == 1 and err.startswith("python -m machinery.gpu_check: "), err
    assert re.search(message, err), err


def test_help_shows_the_budgets(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--help"])
    help = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "python -m machinery.gpu_check --out gc" in help
    assert "(seconds on a GPU: bench 170, train 120, sample 60, fid 25, test_cuda 105) (default: 1.0)" in help
