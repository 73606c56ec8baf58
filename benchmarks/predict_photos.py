"""How often `predict` reads realistic photos right, against a naive resize of the photo.

Builds photos from MNIST test digits with helpers.photos.synthetic_photo (big noisy
canvases, uneven light, small off-centre rotated digits, PNG/JPEG/BMP/WebP, light or dark
ink), then reads each with the MNIST-style preprocessing and with a plain 28x28 resize.

    python benchmarks/predict_photos.py RUN_DIR --data-dir ../shared/data/mnist [--photos 500]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from digitlab.checkpoint import load_checkpoint
from digitlab.data import read_folder
from digitlab.evaluate import model_outputs
from digitlab.reading.image import load_grey

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/helpers: not shipped in the wheel
from digitlab.reading.predict import predict_files
from helpers.photos import naive_resize, synthetic_photo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a classifier's run folder or model.safetensors")
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--photos", type=int, default=500, help="how many photos (default: %(default)s)")
    args = parser.parse_args()
    data = read_folder(args.data_dir)
    model, meta = load_checkpoint(args.checkpoint)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        files, labels = [], []
        for k in range(args.photos):
            i = int(rng.integers(len(data.test_labels)))
            photo = synthetic_photo(data.test_images[i].numpy(), rng)
            fmt = ["png", "jpg", "bmp", "webp"][k % 4]
            if fmt in ("jpg", "bmp"):
                photo = photo.convert("RGB")
            path = Path(tmp) / f"photo{k:04d}.{fmt}"
            photo.save(path, quality=80) if fmt in ("jpg", "webp") else photo.save(path)
            files.append(path)
            labels.append(int(data.test_labels[i]))
        ours = np.mean([p.text == str(y) for p, y in zip(predict_files(model, meta, files), labels)])
        single = np.mean([p.text == str(y) for p, y in zip(predict_files(model, meta, files, single=True), labels)])
        naive = np.stack([naive_resize(load_grey(f)) for f in files])
        guesses = model_outputs(model, torch.from_numpy(naive)).argmax(1).numpy()
    print(f"{args.photos} photos, model {meta.model} ({meta.results['test_accuracy']:.2%} on MNIST test)")
    print("| preprocessing | agreement with the label |\n|---|---:|")
    print(f"| digitlab (Otsu, crop, 20x20 box, centre of mass), reading whole numbers | {ours:.1%} |")
    print(f"| the same with `--single` (one digit per picture) | {single:.1%} |")
    print(f"| naive resize of the whole photo to 28x28 | {np.mean(guesses == np.array(labels)):.1%} |")


if __name__ == "__main__":
    main()
