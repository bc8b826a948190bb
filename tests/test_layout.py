"""The repository's three rooms: the paper's six files at the root, the machinery below them, the
research in beyond/ on top; nothing at the root or in the machinery loads or names beyond/."""

import glob
import inspect
import os
import re
import subprocess
import sys

import train
from conftest import ENV, ROOT

PAPER = ["fid.py", "sample.py", "smd.py", "toy.py", "train.py", "unet.py"]
MACHINERY = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "machinery", "*.py"))
                   if not p.endswith("__init__.py"))


def test_the_root_holds_the_six_paper_files_and_no_other_python():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))) == PAPER
    assert {"checkpoint", "cli", "data", "inception", "pretrained", "bench", "gpu_check"} <= set(MACHINERY)


def test_the_paper_and_the_machinery_load_nothing_from_beyond():
    modules = [p[:-3] for p in PAPER] + [f"machinery.{m}" for m in MACHINERY]
    code = (f"import sys, {', '.join(modules)}; "
            "print([m for m in sys.modules if m == 'beyond' or m.startswith('beyond.')])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_no_paper_or_machinery_file_names_beyond():
    files = PAPER + [os.path.join("machinery", f"{m}.py") for m in MACHINERY] + ["machinery/__init__.py"]
    named = {f: m.group(0) for f in files if (m := re.search(r"\bbeyond[/.]\w*", open(os.path.join(ROOT, f)).read()))}
    assert not named, named


def test_train_main_takes_no_model_or_chain_classes():
    assert list(inspect.signature(train.main).parameters) == ["argv"]
