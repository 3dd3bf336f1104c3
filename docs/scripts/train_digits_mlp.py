"""Train the digits MLP that ships inside errprop (``errprop.digits_mlp()``, ``errprop demo``).

    python docs/scripts/train_digits_mlp.py      # writes errprop/data/digits-mlp/, prints accuracy

scikit-learn's digits (1797 8x8 images, pixels 0..16, shipped with scikit-learn, no
download) split, stratified with seed 0, into training (60%), calibration (15%) and test
(25%) images; the network sees only the training images. Inputs are normalised as
``pixels / 16`` (in [0, 1]). An ``MLPClassifier`` 64-64-32-10 with ReLU and a softmax
output, trained with Adam (seed 0), is converted with ``errprop.from_sklearn`` and written
with ``errprop.save`` to ``errprop/data/digits-mlp/`` (``model.json`` + ``weights.npz``).
Next to it, ``digits.npz`` holds the held-out images as raw ``uint8`` pixels with their
labels: the test split (``x_test``, ``y_test``) and the calibration split (``x_calib``,
``y_calib``), on which ``errprop demo`` plans bit widths before verifying them on the test
split. (Training images make a poor calibration set: the network is certain of them, its
softmax saturates and their output error is far smaller than on new images.)
``metadata.json`` records the accuracies, so ``tests/test_digits.py`` can check the
shipped files against them.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

import errprop as ep
from errprop._files import write_text

DATA = Path(__file__).resolve().parents[2] / "errprop" / "data"
SEED = 0
HIDDEN = (64, 32)
CALIBRATION = 0.15  # of all images
TEST = 0.25


def main() -> None:
    pixels, labels = load_digits(return_X_y=True)
    pixels = pixels.astype(np.uint8)  # integers 0..16: stored exactly as uint8
    p_rest, p_test, y_rest, y_test = train_test_split(
        pixels, labels, test_size=TEST, stratify=labels, random_state=SEED)
    p_train, p_calib, y_train, y_calib = train_test_split(
        p_rest, y_rest, test_size=CALIBRATION / (1 - TEST), stratify=y_rest,
        random_state=SEED)
    model = MLPClassifier(HIDDEN, activation="relu", solver="adam", alpha=1e-4,
                          max_iter=500, random_state=SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # it must converge
        model.fit(p_train / 16.0, y_train)
    net = ep.from_sklearn(model)
    x_test = p_test / 16.0
    probs = net(x_test)
    if not np.allclose(probs, model.predict_proba(x_test), rtol=0, atol=1e-12):
        raise SystemExit("from_sklearn does not reproduce predict_proba")
    train_acc = float(model.score(p_train / 16.0, y_train))
    test_acc = float(np.mean(np.argmax(probs, axis=1) == y_test))
    calib_acc = float(np.mean(np.argmax(net(p_calib / 16.0), axis=1) == y_calib))

    folder = ep.save(net, DATA / "digits-mlp")
    with open(folder / "digits.npz.tmp", "wb") as f:
        np.savez_compressed(f, x_test=p_test, y_test=y_test.astype(np.uint8),
                            x_calib=p_calib, y_calib=y_calib.astype(np.uint8))
    (folder / "digits.npz.tmp").replace(folder / "digits.npz")
    meta = {"source": "sklearn.datasets.load_digits", "normalisation": "pixels / 16",
            "split": "train_test_split(stratify=labels, random_state=0): test 25%, then "
                     "calibration 15% of all images from the rest, training the remaining 60%",
            "model": f"MLPClassifier({HIDDEN}, activation='relu', solver='adam', "
                     f"alpha=1e-4, max_iter=500, random_state={SEED})",
            "widths": [64, *HIDDEN, 10], "iterations": int(model.n_iter_),
            "train_images": len(p_train), "test_images": len(p_test),
            "calibration_images": len(p_calib), "train_accuracy": train_acc,
            "calibration_accuracy": calib_acc, "test_accuracy": test_acc,
            "test_correct": int(round(test_acc * len(p_test)))}
    write_text(folder / "metadata.json", json.dumps(meta, indent=1) + "\n")
    folder.chmod(0o755)  # the temporary files and folder were private; these ship
    for f in folder.iterdir():
        f.chmod(0o644)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"digits MLP 64-{'-'.join(map(str, HIDDEN))}-10 relu: {net.num_params()} "
          f"parameters, {model.n_iter_} Adam epochs; accuracy train {train_acc:.4f}, "
          f"calibration {calib_acc:.4f}, test {test_acc:.4f} ({meta['test_correct']}/"
          f"{len(p_test)} held-out images); wrote {folder} ({size / 1024:.1f} kB)")


if __name__ == "__main__":
    sys.exit(main())
