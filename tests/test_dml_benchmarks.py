"""Loaders of the published DML benchmarks (CUB200-2011, CARS196, Stanford Online Products) on
tiny fixtures written here in the exact published layouts: splits, labels, names, lazy images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from baton.errors import BatonError
from finetune.datasets import load_dataset, load_image


def _jpg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 16, 3), value, np.uint8)).save(path)


def make_cub(root: Path) -> None:
    classes = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross",
               101: "101.White_Pelican", 200: "200.Common_Yellowthroat"}
    images, labels, n = [], [], 0
    for cid, raw in classes.items():
        for k in range(2):
            n += 1
            rel = f"{raw}/{raw.split('.')[1]}_{k:04d}_{n}.jpg"
            _jpg(root / "images" / rel, cid)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {cid}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{c} {r}" for c, r in classes.items()) + "\n")


def test_cub200(tmp_path):
    make_cub(tmp_path / "CUB_200_2011")
    split = load_dataset("cub200", tmp_path)  # the parent of CUB_200_2011/ works too
    assert [(y, c) for _, y, c in split.train] == [(0, "black footed albatross")] * 2 + [(1, "laysan albatross")] * 2
    assert [(y, c) for _, y, c in split.test] == [(0, "white pelican")] * 2 + [(1, "common yellowthroat")] * 2
    assert isinstance(split.train[0][0], Path)  # decoded when used
    assert load_image(split.test[2][0]).getpixel((0, 0)) == (200, 200, 200)


def test_cars196(tmp_path):
    from scipy.io import savemat

    names = [f"Make{i} Model {2000 + i}" for i in range(1, 197)]
    annos, n = [], 0
    for cid in (1, 2, 99, 196):
        for _ in range(2):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            _jpg(tmp_path / rel, cid)
            annos.append((rel, 1, 2, 10, 11, cid, n % 2))
    dt = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
          ("class", "O"), ("test", "O")]
    rec = np.array([tuple(np.array([[v]]) if not isinstance(v, str) else np.array([v]) for v in a) for a in annos],
                   dtype=dt).reshape(1, -1)
    cls = np.empty((1, 196), dtype=object)
    for i, nm in enumerate(names):
        cls[0, i] = np.array([nm])
    savemat(str(tmp_path / "cars_annos.mat"), {"annotations": rec, "class_names": cls})
    split = load_dataset("cars196", tmp_path)
    assert [(y, c) for _, y, c in split.train] == [(0, names[0])] * 2 + [(1, names[1])] * 2
    assert [(y, c) for _, y, c in split.test] == [(0, names[98])] * 2 + [(1, names[195])] * 2
    assert load_image(split.test[3][0]).getpixel((0, 0)) == (196, 196, 196)
    (tmp_path / "cars_annos.mat").unlink()
    with pytest.raises(BatonError, match="cars_annos.mat"):
        load_dataset("cars196", tmp_path)


def test_sop(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path\n"
    train = [(1, 1, 1, "bicycle_final/111_0.JPG"), (2, 1, 1, "bicycle_final/111_1.JPG"),
             (3, 7, 2, "coffee_maker_final/222_0.JPG"), (4, 7, 2, "coffee_maker_final/222_1.JPG")]
    test = [(5, 11319, 1, "bicycle_final/333_0.JPG"), (6, 11319, 1, "bicycle_final/333_1.JPG"),
            (7, 11320, 3, "sofa_final/444_0.JPG")]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        for r in rows:
            _jpg(root / r[3], r[1] % 250)
        (root.mkdir(parents=True, exist_ok=True), (root / name).write_text(
            header + "".join(" ".join(map(str, r)) + "\n" for r in rows)))
    split = load_dataset("sop", tmp_path)
    assert [(y, c) for _, y, c in split.train] == [(0, "bicycle"), (0, "bicycle"), (1, "coffee maker"), (1, "coffee maker")]
    assert [(y, c) for _, y, c in split.test] == [(0, "bicycle"), (0, "bicycle"), (1, "sofa")]
    assert split.train[2][0] == root / "coffee_maker_final/222_0.JPG"
    (root / "Ebay_test.txt").write_text(header + "5 11319\n")
    with pytest.raises(BatonError, match="Ebay_test.txt: line 2"):
        load_dataset("sop", tmp_path)


@pytest.mark.slow
def test_timm_backbone_saves_and_reloads(tmp_path):
    import torch

    from finetune.model import (EmbeddingModel, build_transform, load_embedding_model, load_timm_backbone,
                                save_embedding_model)

    torch.manual_seed(0)
    backbone, meta = load_timm_backbone("resnet10t", pretrained=False)
    assert meta["library"] == "timm" and meta["embedding_dim"] == 512
    model = EmbeddingModel(backbone, meta["embedding_dim"], 16).eval()
    save_embedding_model(model, {**meta, "preprocess": {**meta["preprocess"], "resize": 256}}, tmp_path / "m")
    again, saved = load_embedding_model(tmp_path / "m")
    tf = build_transform(saved["preprocess"])
    x = tf(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)))
    size = meta["preprocess"]["image_size"]
    assert x.shape == (3, size, size) and size < 256  # shorter side 256, then the centre crop
    with torch.no_grad():
        assert torch.equal(again.eval()(x[None]), model(x[None]))


@pytest.mark.parametrize("name", ["cub200_softtriple_elg", "cub200_multisimilarity_plg", "cars196_softtriple_elg",
                                  "cars196_multisimilarity_plg", "sop_softtriple_elg", "sop_multisimilarity_plg",
                                  "demo_softtriple_elg", "demo_softtriple_plg"])
def test_recipes_load(name):
    from baton.config import load_config
    from finetune.config import FinetuneConfig

    cfg = load_config(FinetuneConfig, Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert cfg.language.mode in ("elg", "plg") and cfg.language.weight > 0
    assert cfg.data.batch_size % cfg.data.m_per_class == 0
