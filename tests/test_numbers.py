"""Whole numbers and honest confidence: several digits in a row, calibration, "not sure".

The numbers are real MNIST test digits of the small set, set in a row by
helpers.handwriting.number and put on paper (dark ink on uneven light, or light ink on a
dark board) by on_paper, then saved as real image files.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from digitlab.checkpoint import read_checkpoint
from digitlab.evaluate import expected_calibration_error, fit_temperature
from digitlab.reading.image import ImageError, load_grey
from digitlab.reading.predict import Prediction, readings
from digitlab.reading.segment import Found, find_digits
from digitlab.tasks import get_task, probabilities
from helpers.handwriting import non_digit, number, on_paper, pen_digit

N_NUMBERS = 40


def _digit_ink(digits, i: int) -> np.ndarray:
    """Test digit i as ink in [0, 1], 4x larger (a photo's resolution), without MNIST's empty margin."""
    im = Image.fromarray(digits.test_images[i].numpy()).resize((112, 112), Image.Resampling.BICUBIC)
    ink = np.asarray(im, dtype=np.float32) / 255
    rows, cols = np.nonzero(ink.max(1) > 0.2)[0], np.nonzero(ink.max(0) > 0.2)[0]
    return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


@pytest.fixture(scope="module")
def numbers(digits, tmp_path_factory):
    """N_NUMBERS pictures of 2-5 digit numbers; {file name: (text, boxes of the digits in the picture)}."""
    folder = tmp_path_factory.mktemp("numbers")
    rng = np.random.default_rng(7)
    truth = {}
    for k in range(N_NUMBERS):
        picks = rng.integers(len(digits.test_labels), size=int(rng.integers(2, 6)))
        ink, boxes = number([_digit_ink(digits, int(i)) for i in picks], rng)
        picture, (dx, dy) = on_paper(ink, rng, dark_board=k % 4 == 0, margin=(0.2, 0.8))
        name = f"n{k:02d}.{['png', 'jpg', 'webp'][k % 3]}"
        picture.save(folder / name, quality=90) if not name.endswith("png") else picture.save(folder / name)
        truth[name] = ("".join(str(int(digits.test_labels[i])) for i in picks),
                       [(x0 + dx, y0 + dy, x1 + dx, y1 + dy) for x0, y0, x1, y1 in boxes])
    return folder, truth


def test_each_digit_of_a_number_is_found_in_its_place(numbers):
    folder, truth = numbers
    right = 0
    for name, (text, boxes) in truth.items():
        found = find_digits(load_grey(folder / name), source=name)
        if len(found) != len(text):
            continue
        # each found box holds the centre of the true digit's box, in order
        right += all(f.box[0] <= (b[0] + b[2]) / 2 <= f.box[2] and f.box[1] <= (b[1] + b[3]) / 2 <= f.box[3]
                     for f, b in zip(found, boxes))
    assert right >= 0.9 * len(truth), f"{right} of {len(truth)} numbers segmented right"  # 37 of 40 when written


def test_predict_reads_whole_numbers(digits_model, numbers, cli):
    folder, truth = numbers
    result = cli("predict", str(digits_model), str(folder), "--json")
    assert result.returncode == 0, result.stderr
    answers = {a["file"].split("/")[-1]: a for a in json.loads(result.stdout)}
    assert set(answers) == set(truth)
    for a in answers.values():
        assert a["text"] == "".join(str(d["digit"]) for d in a["digits"])
        assert a["digit"] is None and a["top3"] is None  # several digits: no single digit
        assert a["confidence"] == pytest.approx(np.prod([d["confidence"] for d in a["digits"]]), rel=1e-6)
        assert a["sure"] == (a["confidence"] >= 0.8)  # the whole number's chance, not each digit's
        boxes = [d["box"] for d in a["digits"]]
        assert boxes == sorted(boxes)  # left to right
    exact = np.mean([answers[n]["text"] == text for n, (text, _) in truth.items()])
    assert exact >= 0.75, f"only {exact:.0%} of the numbers read exactly"
    single = json.loads(cli("predict", str(digits_model), str(folder), "--json", "--single").stdout)
    assert all(len(a["digits"]) == 1 and a["digit"] is not None for a in single)  # --single: one digit each


def _draw(strokes: list[list[tuple[float, float]]], dots: list[tuple[float, float]] = (), size: int = 240,
          width: int = 14) -> np.ndarray:
    """Dark pen strokes (in a unit box) on a light page, as grey in [0, 1]."""
    page = Image.new("L", (size, size), 235)
    draw = ImageDraw.Draw(page)
    for stroke in strokes:
        draw.line([(x * size, y * size) for x, y in stroke], fill=30, width=width, joint="curve")
    for x, y in dots:
        draw.ellipse([x * size - 4, y * size - 4, x * size + 4, y * size + 4], fill=30)
    return np.asarray(page, dtype=np.float32) / 255


def test_a_thin_line_hides_no_digit_and_a_sliver_of_a_picture_breaks_nothing():
    page = np.ones((256, 256), np.float32)
    page[20:90, 20:90] = 0  # a blot ...
    page[40:220, 200:202] = 0  # ... beside a longer, thin pen slip: the blot is still read
    assert any(f.box[0] < 100 for f in find_digits(page))
    for sliver in (np.ones((1, 50), np.float32), np.ones((2, 60), np.float32)):
        sliver[:, 10:40] = 0  # a dash in a picture 1 or 2 px tall
        try:
            found = find_digits(sliver, source="sliver.png")
        except ImageError as e:  # one line is fine too; a crash is not
            assert "sliver.png" in str(e)
        else:
            assert all(f.image.shape == (28, 28) for f in found)


def _stroke_width(digit: np.ndarray) -> float:
    """A prepared digit's stroke width as a share of its long side (2 x area / outline, as MNIST's)."""
    from scipy import ndimage

    ink = digit > 127
    ys, xs = np.nonzero(ink)
    outline = ink.sum() - ndimage.binary_erosion(ink).sum()
    return 2 * ink.sum() / outline / max(np.ptp(ys) + 1, np.ptp(xs) + 1)


def test_hairlines_and_felt_tips_are_prepared_with_mnists_strokes(digits):
    """A ballpoint's hairline would fade to a grey trace at 20x20, and a felt-tip's loops close up: both
    come out with strokes in MNIST's range (its 5th to 95th percentile, measured at 28x28 as here, give
    or take a tenth for the measure's pixel steps)."""
    mnist = [_stroke_width(d) for d in digits.train_images[:300].numpy()]
    low, high = np.percentile(mnist, [5, 95]) * [0.9, 1.1]
    seven = [[(0.3, 0.2), (0.7, 0.2), (0.45, 0.85)]]
    eight = [[(0.5 + 0.16 * np.sin(t), 0.32 - 0.14 * np.cos(t)) for t in np.linspace(0, 2 * np.pi, 30)],
             [(0.5 + 0.2 * np.sin(t), 0.66 + 0.18 * np.cos(t)) for t in np.linspace(0, 2 * np.pi, 30)]]
    for strokes, width in [(seven, 2), (seven, 3), (eight, 2), (eight, 44)]:
        digit = find_digits(_draw(strokes, size=480, width=width), single=True)[0].image
        assert low <= _stroke_width(digit) <= high, (width, _stroke_width(digit), low, high)
    hairline = find_digits(_draw(seven, size=480, width=2), single=True)[0].image
    assert hairline.max() >= 250 and (hairline > 127).sum() >= 30  # solid ink, not a faint trace (was: none over 38)


def test_the_dark_background_at_a_photos_edge_is_not_a_digit():
    """A tilted photo shows the table in a corner: a solid dark wedge at the edge, beside a written 4.
    A drawing that is all one solid shape at the edge is still read (nothing else is ink)."""
    four = [[(0.6, 0.85), (0.6, 0.25), (0.3, 0.65), (0.75, 0.65)]]
    page = Image.fromarray((_draw(four, size=300, width=10) * 255).astype(np.uint8))
    ImageDraw.Draw(page).polygon([(0, 0), (110, 0), (0, 160)], fill=25)  # the table, top left
    found = find_digits(np.asarray(page, np.float32) / 255)
    assert len(found) == 1 and found[0].box[0] > 0.25 * 300  # the 4 alone, not the wedge
    blot = np.ones((200, 200), np.float32)
    blot[:120, :90] = 0  # a solid shape at the edge, and nothing else
    assert len(find_digits(blot)) == 1


def test_a_shadow_across_the_page_is_not_read_as_ink():
    """A phone's shadow over part of the page: the light falls to 15-40% across a short stretch, at any
    angle (as the degraded measuring set's "uneven light"). Its edge is no stroke of a digit: the one
    pen-drawn digit is found alone, in its place, in at least 30 of 40 such pages (20 before the paper
    was taken as the ink's envelope there)."""
    rng = np.random.default_rng(7)
    found_alone = 0
    for k in range(40):
        ink = pen_digit(k % 10, rng)
        picture, (x, y) = on_paper(ink, rng, colour=False, dark_board=False)
        page = np.asarray(picture, np.float32) / 255
        h, w = page.shape
        angle, low = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.4)
        t = np.linspace(-1, 1, w)[None, :] * np.cos(angle) + np.linspace(-1, 1, h)[:, None] * np.sin(angle)
        page *= low + (1 - low) / (1 + np.exp(-6 * (t - rng.uniform(-0.3, 0.3))))
        try:
            found = find_digits(page.astype(np.float32))
        except ImageError:  # the digit lost in the shadow
            continue
        near = 0.2 * max(ink.shape) + 10
        found_alone += len(found) == 1 and all(abs(a - b) < near for a, b in zip(
            found[0].box, (x, y, x + ink.shape[1], y + ink.shape[0])))
    assert found_alone >= 30, f"{found_alone} of 40 shadowed digits found alone in their place"


def test_broken_strokes_stay_one_digit_and_joined_digits_are_cut():
    five = [[(0.62, 0.2), (0.4, 0.2)],  # the bar, written apart from the body
            [(0.37, 0.27), (0.35, 0.5), (0.55, 0.47), (0.65, 0.6), (0.6, 0.78), (0.45, 0.82), (0.33, 0.75)]]
    assert len(find_digits(_draw(five))) == 1
    assert len(find_digits(_draw(five, dots=[(0.5, 0.9)]))) == 1  # a dot the pen left under it
    assert len(find_digits(_draw(five, dots=[(0.9, 0.5)]))) == 1  # a speck of dirt to the side
    # "00" joined by a short stroke at mid-height: one blob, cut into two digits
    zeros = [[(0.1 + dx + 0.14 * np.cos(t), 0.5 + 0.22 * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 40)]
             for dx in (0.14, 0.48)]
    joined = _draw(zeros + [[(0.38, 0.5), (0.44, 0.5)]])
    found = find_digits(joined)
    assert len(found) == 2 and found[0].box[0] < found[1].box[0]  # left first
    assert 0.36 * 240 <= found[0].box[2] <= 0.46 * 240  # cut within the joining stroke (x 0.38-0.44)
    assert len(find_digits(joined, single=True)) == 1


def test_fitted_temperature_undoes_overconfidence():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 10) * 2
    labels = torch.distributions.Categorical(logits=true_logits).sample()  # labels drawn at the true odds
    overconfident = true_logits * 2.5
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    before = expected_calibration_error(probabilities(overconfident), labels)
    after = expected_calibration_error(probabilities(overconfident, t), labels)
    assert before > 0.1 and after < 0.03
    assert torch.equal(probabilities(overconfident, t).argmax(1), overconfident.argmax(1))  # same answers
    assert fit_temperature(overconfident[:50], labels[:50]) is None  # too few to tell
    right = overconfident.argmax(1)
    assert fit_temperature(overconfident, right) is None  # all right: the fit would sharpen without end


def test_a_validated_run_saves_its_temperature_and_both_calibration_errors(digits_model):
    _, meta = read_checkpoint(digits_model / "best.safetensors")
    assert 0.05 < meta.temperature < 20
    results = meta.results
    assert 0 <= results["test_ece"] < 0.1 and 0 <= results["test_ece_uncalibrated"] < 0.2
    _, last = read_checkpoint(digits_model / "model.safetensors")
    # the last epoch's weights have a temperature of their own, fitted on the same split
    assert 0.05 < last.temperature < 20
    if meta.epochs == last.epochs:  # the best epoch was the last: the same weights, the same temperature
        assert last.temperature == meta.temperature


def test_a_number_is_sure_only_when_the_whole_number_is():
    """"57" with a 5 at 0.9 and a 7 at 0.85: each digit passes 0.8, the number (0.765) does not."""
    chances = torch.stack([torch.full((10,), 0.1 / 9).index_fill(0, torch.tensor(5), 0.9),
                           torch.full((10,), 0.15 / 9).index_fill(0, torch.tensor(7), 0.85)])
    found = [Found(np.zeros((28, 28), np.uint8), (10 * k, 0, 10 * k + 9, 20)) for k in range(2)]
    number = Prediction("57.png", readings(get_task("classify"), 1.0, chances.log(), found))
    assert [r.sure for r in number.digits] == [True, True] and number.text == "57"
    assert number.confidence == pytest.approx(float(chances[0, 5] * chances[1, 7])) and number.confidence < 0.8
    assert number.sure is False and number.as_dict()["sure"] is False
    assert Prediction("57.png", number.digits, threshold=0.7).sure is True
    alone = Prediction("5.png", number.digits[:1])
    assert alone.sure is True and alone.confidence == pytest.approx(float(chances[0, 5]))


def test_not_sure_below_the_threshold_with_the_best_guesses(digits_model, tmp_path, cli):
    rng = np.random.default_rng(3)
    picture, _ = on_paper(non_digit("scribble", rng, []), rng, dark_board=False)
    picture.save(tmp_path / "scribble.png")
    strict = cli("predict", str(digits_model), str(tmp_path / "scribble.png"), "--single", "--threshold", "1")
    assert strict.returncode == 0, strict.stderr
    assert "not sure: " in strict.stdout and " or " in strict.stdout
    loose = json.loads(cli("predict", str(digits_model), str(tmp_path / "scribble.png"), "--single",
                           "--threshold", "0", "--json").stdout)[0]
    assert loose["sure"] is True and loose["digit"] == loose["top3"][0]["digit"]
    strict = json.loads(cli("predict", str(digits_model), str(tmp_path / "scribble.png"), "--single",
                            "--threshold", "1", "--json").stdout)[0]
    assert strict["sure"] is False and strict["digit"] == loose["digit"]  # the best guess is kept
    bad = cli("predict", str(digits_model), str(tmp_path / "scribble.png"), "--threshold", "1.5")
    assert bad.returncode == 2 and "--threshold: must be 1 or less, got 1.5" in bad.stderr
    assert "Traceback" not in bad.stderr
