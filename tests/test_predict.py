"""Kept models used: ``harness.load_model`` (in a fresh process), ``predict`` on tensors and files,
``harness predict``, and every refusal of a folder that is not what its card says."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.models.card import write_model_folder
from harness.registry import get_registry
from harness.training.evaluate import forward
from harness.training.inputs import model_input
from harness.training.model import TransferModel
from harness.training.weights import build_backbone

DIGITS = [str(i) for i in range(10)]


def card_for(task: str, head: str, class_names: list[str], image_size: int, stored, **extra):
    """A card as the keep step writes it (the fields a loader reads, and the rest filled)."""
    reg = get_registry()
    bb = build_backbone(reg.get("backbone", "test_resnet"), "test_resnet", "none")
    return {
        "harness_version": "0.1.0",
        "study": "tiny",
        "task": task,
        "class_names": class_names,
        "void_index": 255 if task == "segmentation" else None,
        "backbone": {"plugin": "timm", "distribution": "harness", "name": "test_resnet", "weights": "none"},
        "head": {"plugin": "heads", "name": head, "options": {}},
        "strategy": {"name": "finetune", "options": {}},
        "params": {},
        "trial": 0,
        "seed": extra.pop("seed", 0),
        "preprocessing": {
            "image_size": image_size,
            "stored_size": stored,
            "resize": extra.pop("resize", None),
            "eval": "center-crop" if task == "classification" else "sliding-window",
            "mean": list(bb.mean),
            "std": list(bb.std),
            "channels": "RGB",
            "scale": "uint8/255",
        },
        "pair": {"source": "digits", "target": "digits-m"},
        "selection": {"rule": "target-val", "oracle": False},
        "test": {"accuracy": 0.5},
        "provenance": {},
        **extra,
    }  # fmt: skip


def tiny_model(task: str, head: str, classes: int, image_size: int, seed: int = 0) -> TransferModel:
    reg = get_registry()
    torch.manual_seed(seed)
    bb = build_backbone(reg.get("backbone", "test_resnet"), "test_resnet", "none")
    h = reg.get("head", head).factory(backbone=bb, num_classes=classes, task=task)
    return TransferModel(bb, h, task, image_size).eval()


def kept_classifier(folder: Path, seed: int = 0) -> TransferModel:
    model = tiny_model("classification", "linear", 10, 16, seed)
    write_model_folder(
        folder, model.state_dict(), card_for("classification", "linear", DIGITS, 16, 16, seed=seed)
    )
    return model


def digits_m_test(n: int | None = None) -> torch.Tensor:
    data = get_registry().get("dataset", "digits-m").factory(None, image_size=16, seed=0)
    return data.test.range(0, n or len(data.test))


@torch.no_grad()
def reference_logits(model: TransferModel, x: torch.Tensor) -> torch.Tensor:
    return forward(model, model_input(x, model, False))


FRESH = """
import sys, torch
import harness
m = harness.load_model(sys.argv[1], device="cpu")
x = torch.load(sys.argv[2], weights_only=True)
t = m.predict(x, batch_size=len(x))
f = m.predict(sys.argv[4:], batch_size=len(sys.argv) - 4)
torch.save({"logits": t.logits, "classes": t.classes, "files": f.probabilities,
            "labels": f.labels}, sys.argv[3])
"""


def test_load_in_a_fresh_process_predicts_exactly_the_harness_outputs(tmp_path):
    folder = tmp_path / "model"
    model = kept_classifier(folder)
    x = digits_m_test()
    want = reference_logits(model, x)
    torch.save(x, tmp_path / "x.pt")
    files = []
    for i in range(6):  # the same pixels as files: PNG is lossless, the reader keeps 16 px as is
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(files[-1])
    out = tmp_path / "out.pt"
    subprocess.run(
        [sys.executable, "-c", FRESH, str(folder), str(tmp_path / "x.pt"), str(out), *map(str, files)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["logits"], want)
    assert torch.equal(got["classes"], want.argmax(1))
    assert torch.equal(got["files"], reference_logits(model, x[:6]).softmax(1))
    assert got["labels"] == [DIGITS[i] for i in want[:6].argmax(1).tolist()]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from harness import cli

    monkeypatch.setattr(sys, "argv", ["harness", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    return int(exit_.value.code or 0), captured.out, captured.err


def test_cli_predict_writes_csv_and_json_and_skips_a_bad_file(tmp_path, monkeypatch, capsys):
    from harness import load_model

    folder = tmp_path / "model"
    kept_classifier(folder)
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    x = digits_m_test(3)
    for i, name in enumerate(["a.png", "sub/b.png", "c.jpg"]):
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(images / name)
    (images / "empty.png").write_bytes(b"")
    (images / "notes.txt").write_text("not an image, not listed")
    code, out, err = run_cli(monkeypatch, capsys, "predict", "--model", str(folder), str(images))
    assert code == 1
    assert f"skipped {images / 'empty.png'}: empty file" in err
    lines = out.splitlines()
    assert lines[0] == "path,prediction," + ",".join(DIGITS)
    assert [line.split(",")[0] for line in lines[1:]] == [
        str(images / n) for n in ("a.png", "c.jpg", "sub/b.png")
    ]
    want = load_model(folder).predict([images / "a.png"])
    row = lines[1].split(",")
    assert row[1] == want.labels[0] and np.allclose(
        [float(v) for v in row[2:]], want.probabilities[0]
    )
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "predict",
        "-m",
        str(folder),
        str(images),
        "--out",
        str(tmp_path / "p.json"),
    )
    data = json.loads((tmp_path / "p.json").read_text())
    assert code == 1 and data["class_names"] == DIGITS and len(data["rows"]) == 3
    assert set(data["rows"][0]) == {"path", "prediction", "probabilities"}
    assert abs(sum(data["rows"][0]["probabilities"].values()) - 1) < 1e-5
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", "-m", str(folder), str(images), "--strict"
    )
    assert code == 2 and "empty.png: empty file" in err.splitlines()[0]
    code, _, _ = run_cli(
        monkeypatch,
        capsys,
        "predict",
        "-m",
        str(folder),
        str(images / "a.png"),
        "--out",
        str(tmp_path / "p.csv"),
    )
    assert code == 0 and (tmp_path / "p.csv").read_text().splitlines()[1].startswith(
        str(images / "a.png")
    )
    (tmp_path / "none").mkdir()
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", "-m", str(folder), str(tmp_path / "none")
    )
    assert code == 2 and err.startswith("error: no image files in") and err.count("error:") == 1
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "predict",
        "-m",
        str(folder),
        str(images),
        "--out",
        str(tmp_path / "masks"),
    )
    assert code == 2 and "is a classification model: --out must be a .csv or .json file" in err


MARKER_PICKLE = """
import os, pickle, sys
class Boom:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
open(sys.argv[1], "wb").write(pickle.dumps({"w": Boom()}))
"""


def test_refusals_are_one_line_and_run_nothing(tmp_path, monkeypatch, capsys):
    base = tmp_path / "model"
    kept_classifier(base)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)

    def refused(folder: Path) -> str:
        code, out, err = run_cli(monkeypatch, capsys, "predict", "-m", str(folder), str(image))
        assert code == 2 and out == "", err
        return err.splitlines()[0]

    def copy(name: str) -> Path:
        import shutil

        shutil.copytree(base, tmp_path / name)
        return tmp_path / name

    tampered = copy("tampered")
    raw = bytearray((tampered / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (tampered / "model.safetensors").write_bytes(bytes(raw))
    assert "sha256 mismatch" in refused(tampered)

    pickled, marker = copy("pickled"), tmp_path / "MARKER"
    subprocess.run(
        [sys.executable, "-c", MARKER_PICKLE, str(pickled / "model.safetensors"), str(marker)],
        check=True,
    )
    assert not marker.exists()
    # the same payload, unpickled, does run: the refusal below is what keeps it from running
    proof, proof_marker = tmp_path / "proof.pkl", tmp_path / "PROOF"
    subprocess.run([sys.executable, "-c", MARKER_PICKLE, str(proof), str(proof_marker)], check=True)
    pickle.loads(proof.read_bytes())
    assert proof_marker.exists()
    _rehash(pickled)
    assert "not a safetensors file" in refused(pickled)
    assert not marker.exists()

    newer = copy("newer")
    card = json.loads((newer / "model.json").read_text())
    card["format"] = "harness-model/2"
    write_model_folder(newer, newer / "model.safetensors", card)
    assert "upgrade the harness" in refused(newer)

    unknown = copy("unknown")
    card = json.loads((unknown / "model.json").read_text())
    card["head"]["name"] = "linaer"
    write_model_folder(unknown, unknown / "model.safetensors", card)
    line = refused(unknown)
    assert "unknown head 'linaer'" in line and "'linear'" in line  # fmt: skip


def _rehash(folder: Path) -> None:
    """Make the card and sums agree with a replaced weights file (an attacker could)."""
    from harness.models.card import CARD, SUMS, sha256_file

    card = json.loads((folder / CARD).read_text())
    card["files"]["model.safetensors"] = sha256_file(folder / "model.safetensors")
    (folder / CARD).write_text(json.dumps(card))
    sums = {CARD: sha256_file(folder / CARD), **card["files"]}
    (folder / SUMS).write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))


def test_segmentation_masks_at_each_image_own_size(tmp_path, monkeypatch, capsys):
    from harness import load_model

    monkeypatch.chdir(tmp_path)  # relative --out paths below land here
    model = tiny_model("segmentation", "fpn", 5, 32)
    folder = tmp_path / "seg"
    card = card_for("segmentation", "fpn", list("abcde"), 32, [48, 40], resize="pad")
    card["head"]["plugin"] = "smp_heads"
    write_model_folder(folder, model.state_dict(), card)
    loaded = load_model(folder, device="cpu")
    x = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)
    got = loaded.predict(x)
    want = reference_logits(model, x).argmax(1)
    assert all(np.array_equal(m, w.numpy()) for m, w in zip(got.masks, want, strict=True))
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"wide.png": (70, 30), "tall.jpg": (33, 61), "same.png": (48, 40)}
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "predict",
        "-m",
        str(folder),
        str(images),
        "--out",
        str(tmp_path / "masks"),
    )
    assert code == 0, err
    for name, size in sizes.items():
        mask = Image.open(tmp_path / "masks" / Path(name).with_suffix(".png"))
        assert mask.mode == "P" and mask.size == size
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= {0, 1, 2, 3, 4}
        palette = mask.getpalette()[:15]
        assert len({tuple(palette[i : i + 3]) for i in range(0, 15, 3)}) == 5
    # the stored size is the image's own: the mask is the prediction on the tensor itself
    same = np.asarray(Image.open(tmp_path / "masks" / "same.png"))
    pixels = torch.from_numpy(np.array(Image.open(images / "same.png"))).permute(2, 0, 1)[None]
    assert np.array_equal(same, reference_logits(model, pixels).argmax(1)[0].numpy())
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", "-m", str(folder), str(images), "-o", "x.csv"
    )
    assert code == 2 and "segmentation model: --out must be a folder" in err
    masks = tmp_path / "labels"
    masks.mkdir()
    for name, (w, h) in sizes.items():  # the ground truth, handed over by mistake
        Image.fromarray(rng.integers(0, 5, (h, w), dtype=np.uint8)).save(masks / f"{name}.png")
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", "-m", str(folder), str(masks), "-o", "m2"
    )
    assert code == 2 and "is a label mask" in err.splitlines()[0] and not Path("m2").exists()


def test_a_mask_goes_back_onto_the_image_it_was_read_from():
    from harness.models.predict import Preprocessing, to_own_size

    stored = np.ones((40, 48), np.uint8)
    crop = to_own_size(stored, (96, 40), Preprocessing(32, (48, 40), "center-crop"))
    # the stored image is the centre 48 of the image's 96 columns: void on either side
    assert crop.shape == (40, 96) and (crop[:, 24:72] == 1).all()
    assert (crop[:, :24] == 255).all() and (crop[:, 72:] == 255).all()
    padded = np.full((40, 48), 255, np.uint8)
    padded[10:30] = 3  # a 96x40 image padded into 48x40: content rows 10..29
    back = to_own_size(padded, (96, 40), Preprocessing(32, (48, 40), "pad"))
    assert back.shape == (40, 96) and (back == 3).all()
