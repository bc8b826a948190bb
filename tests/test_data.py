"""data.py: an image folder is checked whole before the first batch (broken files named, mixed
grayscale/colour read as RGB), and batch sizes or image sizes the data cannot take are refused
before anything is allocated. (batch_plan's resume is tested in test_train.py.)"""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from machinery import data

pytestmark = pytest.mark.usefixtures("one_thread")


def write_images(folder, n, gray=False, ext="png", seed=0, start=0):
    """n random images of varied sizes, as folder/<start + i>.<ext>."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = rng.integers(12, 30, 2)
        pixels = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{start + i:03d}.{ext}")


def encoded(fmt, seed=0):
    """A valid 24x24 RGB image file's bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def batches(folder, batch_size=4, image_size=8, **kw):
    return data.make_batches(str(folder), None, batch_size, image_size, workers=0, **kw)


def test_broken_images_named_before_any_batch(tmp_path):
    write_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    png, jpg = encoded("PNG"), encoded("JPEG")
    (tmp_path / "imgs" / "cut.png").write_bytes(png[:len(png) // 2])
    (tmp_path / "imgs" / "cut.jpg").write_bytes(jpg[:len(jpg) // 2])
    with pytest.raises(ValueError) as e:
        batches(tmp_path / "imgs")
    msg = str(e.value)
    assert "3 of 7 images cannot be read" in msg and "Remove or replace them" in msg and "\n" not in msg
    assert all(name in msg for name in ("noise.png", "cut.png", "cut.jpg")), msg


def test_many_broken_images_name_the_first_three(tmp_path):
    write_images(tmp_path / "imgs", 2)
    for i in range(5):
        (tmp_path / "imgs" / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"5 of 7 images cannot be read: .*bad0\.jpg.*bad2\.jpg.* and 2 more\."):
        data.ImageFolder(str(tmp_path / "imgs"), 8)


def test_mixed_folder_reads_as_rgb_and_says_so(tmp_path, capsys):
    write_images(tmp_path / "imgs", 2, gray=True)   # gray first: the first file used to decide
    write_images(tmp_path / "imgs", 3, start=2)
    x, channels, size = batches(tmp_path / "imgs")
    assert (channels, size) == (3, 8) and next(x).shape == (4, 3, 8, 8)
    assert "2 of 5 images are grayscale: converted to RGB" in capsys.readouterr().out


def test_gray_folder_stays_one_channel(tmp_path, capsys):
    write_images(tmp_path / "gray", 5, gray=True)
    x, channels, _ = batches(tmp_path / "gray")
    assert channels == 1 and next(x).shape == (4, 1, 8, 8)
    assert capsys.readouterr().out == ""


def test_a_folder_says_how_many_images_it_read_and_what_it_skipped(tmp_path, capsys):
    write_images(tmp_path / "imgs", 3, ext="png")
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "x.gif")
    (tmp_path / "imgs" / "notes.txt").write_text("")
    batches(tmp_path / "imgs", batch_size=2)
    out = capsys.readouterr().out
    assert f"{tmp_path / 'imgs'}: 3 images; skipped 2 other files (.gif: 1, .txt: 1; read: .bmp" in out, out
    write_images(tmp_path / "clean", 3)
    batches(tmp_path / "clean", batch_size=2, verbose=True)
    assert capsys.readouterr().out == f"{tmp_path / 'clean'}: 3 images\n"


def test_named_dataset_says_where_it_was_read(cifar_dir, capsys):
    data.make_batches("cifar10", cifar_dir, 8, None, verbose=True)
    assert f"cifar10: train images from {cifar_dir}/cifar-10-batches-py" in capsys.readouterr().out


def test_folder_batches_shape_dtype_range(tmp_path):
    write_images(tmp_path / "imgs", 3, ext="png")
    write_images(tmp_path / "imgs", 3, ext="jpg", start=3)
    x, channels, size = batches(tmp_path / "imgs", image_size=16, seed=1)
    for _ in range(4):   # 4 steps of 4 out of 6 images cross 4 epochs
        b = next(x)
        assert b.shape == (4, 3, 16, 16) and b.dtype == torch.float32 and -1 <= b.min() <= b.max() <= 1


def test_named_dataset_batches(cifar_dir):
    x, channels, size = data.make_batches("cifar10", cifar_dir, 8, None, seed=0)
    b = next(x)
    assert (channels, size) == (3, 32) and b.shape == (8, 3, 32, 32) and b.dtype == torch.float32


@pytest.mark.parametrize("batch_size, why", [(0, "use a positive number"), (-4, "use a positive number"),
                                             (7, r"larger than the dataset \(6 images\): use at most 6")])
def test_bad_batch_size_refused(tmp_path, batch_size, why):
    write_images(tmp_path / "imgs", 6)
    with pytest.raises(ValueError, match=rf"batch size {batch_size}\b.*{why}"):
        batches(tmp_path / "imgs", batch_size)


def test_bad_batch_size_refused_before_loading(cifar_dir, monkeypatch):
    monkeypatch.setattr(torch, "from_numpy", lambda a: pytest.fail("the images were copied into a tensor"))
    with pytest.raises(ValueError, match=r"batch size 41 is larger than the dataset \(40 images\)"):
        data.make_batches("cifar10", cifar_dir, 41)
    monkeypatch.setattr(data, "load_images", lambda *a: pytest.fail("the dataset was loaded"))
    with pytest.raises(ValueError, match="batch size -4: use a positive number"):
        data.make_batches("cifar10", cifar_dir, -4)
    with pytest.raises(ValueError, match="batch size 6: use a positive multiple of the 4 ranks"):
        data.make_batches("cifar10", cifar_dir, 6, world=4)
    with pytest.raises(ValueError, match="batch size -2"):
        next(data.batch_plan(20, -2, 0, 1, seed=0, step=0))   # called directly, too


@pytest.mark.parametrize("image_size", [0, -8])
def test_bad_image_size_refused(tmp_path, image_size):
    write_images(tmp_path / "imgs", 4)
    with pytest.raises(ValueError, match=f"--image-size {image_size}: use a positive number of pixels"):
        batches(tmp_path / "imgs", image_size=image_size)


def test_named_dataset_takes_32_or_its_average_pools(cifar_dir):
    """A named dataset is 32x32, or those images average-pooled in 2x2 (16) or 4x4 (8) blocks."""
    with pytest.raises(ValueError, match=r"cifar10 comes at --image-size 32 \| 16 \| 8 .*not 64"):
        data.make_batches("cifar10", cifar_dir, 4, 64)
    full = data.load_images("cifar10", cifar_dir)
    half = data.load_images("cifar10", cifar_dir, size=16)
    block = full[:, :, :2, :2].reshape(len(full), 3, 4).astype(np.float64).mean(-1)   # the top-left 2x2 block
    assert half.shape == (len(full), 3, 16, 16) and half.dtype == np.uint8
    assert np.array_equal(half[:, :, 0, 0], np.round(block).astype(np.uint8))   # exact: a mean of 4 bytes
    x, channels, size = data.make_batches("cifar10", cifar_dir, 4, 8, flip=False)
    assert (channels, size) == (3, 8) and next(x).shape == (4, 3, 8, 8)


def test_empty_folder_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        batches(tmp_path / "empty")


def test_atomic_write_gives_the_permissions_open_gives(tmp_path):
    """Results and checkpoints are written through a temporary file; the final file has the mode
    a plain open() would give it under the current umask (mkstemp alone gives 0600), and no
    temporary file is left."""
    old = os.umask(0o022)
    try:
        (tmp_path / "plain.json").write_text("{}")
        data.save_json({"a": 1}, str(tmp_path / "r.json"))
        data.atomic_write(str(tmp_path / "r.json"), lambda f: f.write(b"{}"))   # over an existing file
    finally:
        os.umask(old)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777
    assert mode("r.json") == mode("plain.json") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json", "r.json"]
