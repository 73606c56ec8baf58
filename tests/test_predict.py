"""Predicting handwriting from realistic pictures, built from MNIST test digits.

Each picture is what a phone photo or a scan of a digit on paper looks like: a large
canvas, paper with uneven lighting and noise, dark ink (or chalk-like light ink on a dark
board), the digit small, off-centre and a little rotated, saved as PNG, JPEG, BMP or
WebP, grey, RGB or RGBA.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from conftest import one_error_line
from digitlab.checkpoint import load_checkpoint
from digitlab.reading import image
from digitlab.reading.image import ImageError, load_grey, open_grey
from digitlab.reading.segment import preprocess
from helpers.photos import naive_resize, synthetic_photo

N_PHOTOS = 120


@pytest.fixture(scope="session")
def photos(mnist, tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    labels = {}
    for k in range(N_PHOTOS):
        i = int(rng.integers(len(mnist.test_labels)))
        photo = synthetic_photo(mnist.test_images[i].numpy(), rng)
        fmt = ["png", "jpg", "bmp", "webp"][k % 4]
        if fmt in ("jpg", "bmp") and photo.mode == "RGBA":
            photo = photo.convert("RGB")
        path = folder / f"photo{k:03d}.{fmt}"
        photo.save(path, quality=80) if fmt in ("jpg", "webp") else photo.save(path)
        labels[path.name] = int(mnist.test_labels[i])
    return folder, labels


def test_predict_reads_realistic_photos(mnist_model, photos, tmp_path, cli):
    """The best preset's recipe (convnet, AdamW, onecycle, augmentation), cut to one epoch on the full set."""
    folder, labels = photos
    result = cli("predict", str(mnist_model), str(folder), "--json", "--save-preprocessed", str(tmp_path / "seen"))
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert len(answers) == N_PHOTOS
    for a in answers:
        assert set(a) == {"file", "text", "sure", "digit", "confidence", "top3", "digits"}
        assert a["top3"][0]["digit"] == a["digit"] and 0 < a["confidence"] <= 1 and a["text"] == str(a["digit"])
        assert a["sure"] == (a["confidence"] >= 0.8) and len(a["digits"]) == 1
    agree = np.mean([a["digit"] == labels[a["file"].split("/")[-1]] for a in answers])
    assert agree >= 0.95, f"only {agree:.0%} of the photos read right"
    seen = sorted(p.name for p in (tmp_path / "seen").iterdir())
    assert len(seen) == N_PHOTOS and seen[0].startswith("photo000.") and seen[0].endswith(".28x28.png")
    assert Image.open(tmp_path / "seen" / seen[0]).size == (28, 28)

    # The naive way, shrinking the whole picture to 28x28, reads far fewer of the same photos.
    model, meta = load_checkpoint(mnist_model)
    from digitlab.evaluate import model_outputs

    naive = np.stack([naive_resize(load_grey(folder / name)) for name in sorted(labels)])
    guesses = model_outputs(model, torch.from_numpy(naive)).argmax(1).numpy()
    naive_agree = np.mean(guesses == np.array([labels[n] for n in sorted(labels)]))
    assert naive_agree < agree - 0.4, (naive_agree, agree)


def test_preprocess_centres_the_digit_like_mnist(digits):
    rng = np.random.default_rng(1)
    image = np.asarray(synthetic_photo(digits.test_images[0].numpy(), rng).convert("L"), dtype=np.float32) / 255
    digit = preprocess(image)
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    ys, xs = np.nonzero(digit > 30)
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) <= 21  # fits the 20x20 box (plus anti-aliasing)
    mass = digit.astype(float)
    cy = (mass.sum(1) * np.arange(28)).sum() / mass.sum()
    cx = (mass.sum(0) * np.arange(28)).sum() / mass.sum()
    assert abs(cy - 13.5) < 0.6 and abs(cx - 13.5) < 0.6
    assert digit[0].max() == 0 and digit[:, 0].max() == 0  # clean background, as in MNIST


def test_bad_pictures_get_one_line_each(digits_model, tmp_path, cli):
    (tmp_path / "notes.png").write_text("this is not an image")
    Image.new("L", (400, 300), 230).save(tmp_path / "blank.png")
    good = Image.new("L", (200, 200), 235)
    good.paste(Image.new("L", (16, 90), 20), (90, 55))  # a dark vertical stroke: a "1"
    good.save(tmp_path / "one.png")
    whole = (tmp_path / "one.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    result = cli("predict", str(digits_model), str(tmp_path), "--json")
    assert result.returncode == 2  # some inputs were bad ...
    answers = {a["file"].split("/")[-1]: a for a in json.loads(result.stdout)}
    assert answers["one.png"]["digit"] == 1  # ... and the good one was still read
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"checkpoint: {digits_model / 'best.safetensors'} (best validation accuracy")
    errors = lines[1:]
    assert len(errors) == 3 and "Traceback" not in result.stderr
    assert any("blank.png: no digit found" in e for e in errors)
    assert any("notes.png: not an image" in e for e in errors)
    assert any("cut.png: broken or truncated image" in e for e in errors)


def test_huge_images_are_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(path)  # 48 megapixels, a few kB on disk
    with pytest.raises(ImageError, match="8000x6000 is over 40 megapixels"):
        load_grey(path)
    Image.new("1", (20000, 10000)).save(path)  # 200 MP: Pillow's own guard fires first
    with pytest.raises(ImageError, match="huge.png: the image is over 40 megapixels"):
        load_grey(path)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16", "1"])
@pytest.mark.parametrize("kind", ["plain", "transparent", "exif", "xmp", "raw exif", "large", "no pyspng", "cut"])
def test_an_uploaded_png_reads_as_pillow_decodes_it(mode, kind, tmp_path, monkeypatch):
    """Uploads (bytes) of small plain PNGs are decoded by libspng, files by Pillow: the same grey pixels
    (an orientation in EXIF, XMP or a raw profile turns both), and the same one-line error for a cut file."""
    pytest.importorskip("pyspng")
    rng = np.random.default_rng(7)
    size = (600, 500) if kind == "large" else (83, 61)  # not square: a turn shows in the shape
    pixels = rng.integers(0, 256, (size[1], size[0], len(Image.new(mode, (1, 1)).getbands())), dtype=np.uint8)
    if kind != "transparent" and mode in ("LA", "RGBA"):
        pixels[..., -1] = rng.choice([0, 128, 255], pixels.shape[:2])  # partly see-through ink
    picture = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).convert(mode)
    turned = Image.Exif()
    turned[0x0112] = 6  # a quarter turn
    info = PngImagePlugin.PngInfo()
    if kind == "xmp":
        info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description '
                      'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>', zip=True)
    if kind == "raw exif":
        raw = turned.tobytes()
        info.add_text("Raw profile type exif", f"\nexif\n{len(raw)}\n{raw.hex()}", zip=True)
    options = {"pnginfo": info}
    if kind == "exif":
        options["exif"] = turned
    if kind == "transparent" and mode in ("L", "P", "RGB"):
        options["transparency"] = (0, 0, 0) if mode == "RGB" else 0
    if kind == "no pyspng":
        monkeypatch.setattr(image, "pyspng", None)
    path = tmp_path / "p.png"
    picture.save(path, **options)
    data = path.read_bytes()
    if kind == "cut":
        data = data[:len(data) * 2 // 3]
        path.write_bytes(data)
        with pytest.raises(ImageError) as from_file:
            open_grey(path, name="p.png")
        with pytest.raises(ImageError) as from_upload:
            open_grey(data, name="p.png")
        assert str(from_upload.value) == str(from_file.value)
        return
    upload, file = open_grey(data), open_grey(path)
    assert upload.mode == file.mode and np.array_equal(np.asarray(upload), np.asarray(file))
    if kind in ("exif", "xmp", "raw exif"):
        assert file.size == (size[1], size[0])  # Pillow turned it, and so the upload was turned too
    fast = kind in ("plain", "transparent") and "transparency" not in options and mode in ("L", "RGB", "RGBA")
    assert (image._spng(data, Image.open(io.BytesIO(data))) is not None) == fast, "libspng takes plain PNGs only"


def test_light_ink_and_transparency(tmp_path):
    canvas = Image.new("RGBA", (300, 300), (0, 0, 0, 0))  # transparent background
    canvas.paste(Image.new("RGBA", (20, 120), (10, 10, 10, 255)), (140, 90))
    canvas.save(tmp_path / "alpha.png")
    digit = preprocess(load_grey(tmp_path / "alpha.png"))
    assert digit.max() > 200 and digit[14, 14] > 100  # ink found in the middle
    board = Image.new("L", (300, 300), 30)
    board.paste(Image.new("L", (20, 120), 220), (140, 90))  # chalk on a blackboard
    assert np.array_equal(preprocess(np.asarray(board, dtype=np.float32) / 255) > 100, digit > 100)


def test_corrupt_checkpoint_is_refused(tmp_path, cli):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    Image.new("L", (50, 50), 255).save(tmp_path / "x.png")
    result = cli("predict", str(bad), str(tmp_path / "x.png"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not a readable checkpoint" in result.stderr and "damaged" in result.stderr
    onnx, text = tmp_path / "model.onnx", tmp_path / "notes.txt"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX protobuf's first bytes
    text.write_text("not a model\n")
    one_error_line(cli("predict", str(onnx), str(tmp_path / "x.png")), "an exported ONNX model", "digitlab serve")
    one_error_line(cli("evaluate", str(text)), "notes.txt: not a checkpoint", "give a run folder")
    (tmp_path / "empty").mkdir()
    one_error_line(cli("evaluate", str(tmp_path / "empty")), "the folder holds no model.safetensors")


def _a_seven(size: int = 200) -> np.ndarray:
    """A '7' as ink strength in [0, 1] on a size x size page: a top bar and a slanted stroke."""
    page = Image.new("L", (size, size), 0)
    from PIL import ImageDraw

    draw = ImageDraw.Draw(page)
    w = size // 12
    draw.line([(size * 0.25, size * 0.22), (size * 0.75, size * 0.22)], fill=255, width=w)
    draw.line([(size * 0.75, size * 0.22), (size * 0.42, size * 0.8)], fill=255, width=w)
    from scipy import ndimage

    return ndimage.gaussian_filter(np.asarray(page, dtype=np.float32) / 255, 1.5)  # a pen's soft edge


def test_save_preprocessed_names_never_collide_and_all_bad_leaves_no_folder(digits_model, tmp_path, cli):
    ink = _a_seven()
    for rel in ("a/x.png", "a/x.jpg", "b/x.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.fromarray((255 - ink * 200).astype(np.uint8)).save(tmp_path / rel)
    seen = tmp_path / "seen"
    result = cli("predict", str(digits_model), str(tmp_path / "a"), str(tmp_path / "b" / "x.png"),
                 "--save-preprocessed", str(seen))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in seen.iterdir()) == ["a_x.jpg.28x28.png", "a_x.png.28x28.png", "b_x.png.28x28.png"]
    (tmp_path / "junk.png").write_text("not an image")
    result = cli("predict", str(digits_model), str(tmp_path / "junk.png"), "--save-preprocessed",
                 str(tmp_path / "never"))
    assert result.returncode == 2 and not (tmp_path / "never").exists()


def test_sixteen_bit_greys_are_read_at_full_depth(digits_model, tmp_path, cli):
    ink = _a_seven()
    # A pencil 7 in a 16-bit scan: paper at 40,000, ink 8,000 darker, out of 65,535. Pillow's
    # own squeeze to 8 bits clips everything above 255: a white page, "no digit found".
    page = (40000 - ink * 8000).astype(np.uint16)
    path = tmp_path / "faint16.png"
    Image.fromarray(page).save(path)
    assert Image.open(path).mode.startswith("I")
    grey = load_grey(path)
    assert len(np.unique(np.round(grey * 65535))) > 20  # the anti-aliased edge survives
    result = cli("predict", str(digits_model), str(path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["digit"] == 7


def test_a_pipe_and_a_newline_in_a_name_get_one_line(digits_model, tmp_path, cli):
    import os
    import threading

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    unblocked = []

    def unblock():  # a reader stuck on the pipe gets end-of-file, and the test fails instead of hanging
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            unblocked.append(True)
        except OSError:  # ENXIO: nobody is reading it
            pass

    watchdog = threading.Timer(60, unblock)
    watchdog.start()
    try:
        result = cli("predict", str(digits_model), str(fifo))  # must not hang
    finally:
        watchdog.cancel()
    assert not unblocked, "predict waited on a named pipe"
    assert result.returncode == 2 and "not a regular file" in result.stderr
    odd = tmp_path / "two\nlines.png"
    odd.write_text("not an image")
    result = cli("predict", str(digits_model), str(odd))
    errors = [line for line in result.stderr.splitlines() if line.startswith("digitlab: error")]
    assert len(errors) == 1 and "two\\nlines.png: not an image" in errors[0]
    assert result.stderr.strip().splitlines() == errors


def test_a_missing_picture_says_what_to_give(chapter_model, tmp_path, cli):
    one_error_line(cli("predict", str(chapter_model), str(tmp_path / "my-digit.jpg")),
                   "no such file or folder", "give pictures of digits")
