"""Segmentation data: the three layouts on real files, their errors, and mmseg's train and test pipelines."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmixers.coco import load_coco, quiet_pycocotools
from tokenmixers.data import DataError
from tokenmixers.segmentation.data import (
    MEAN,
    STD,
    SegmentationDataset,
    balanced,
    hsv_to_rgb,
    normalize,
    random_crop,
    rescale_size,
    rgb_to_hsv,
    semantic_map,
)
from tokenmixers.segmentation.evaluate import Predictor

from .conftest import SHARED

NUCLEI = SHARED / "data" / "coco-nuclei"
CLASSES = ("sky", "road", "car")


def write_image(path: Path, pixels: np.ndarray) -> Path:
    """An RGB (or single-channel) array saved where its suffix says (PNG or JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def write_palette_label(path: Path, label: np.ndarray) -> Path:
    """A label map saved as a palette PNG: its indices are the values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes("P", (label.shape[1], label.shape[0]), label.astype(np.uint8).tobytes())
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.save(path)
    return path


def colour_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def folder_set(root: Path, labels: dict[str, np.ndarray], split: str = "train",
               classes: Optional[str] = "\n".join(CLASSES) + "\n") -> Path:
    """The folder layout: ``classes.txt``, ``images/<split>/<stem>.png`` and ``annotations/<split>/<stem>.png``."""
    root.mkdir(parents=True, exist_ok=True)
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    for n, (stem, label) in enumerate(labels.items()):
        write_image(root / "images" / split / f"{stem}.png", colour_image(*label.shape, seed=n))
        write_image(root / "annotations" / split / f"{stem}.png", label)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    return root


def stripes(h: int, w: int, values: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    """A label map of vertical stripes of ``values``."""
    return np.array(values, dtype=np.uint8)[np.arange(w) * len(values) // w][None].repeat(h, 0)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """A binary mask as COCO's uncompressed RLE: run lengths in column-major order, starting with zeros."""
    counts, value, run = [], 0, 0
    for pixel in mask.ravel(order="F"):
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    return {"size": list(mask.shape), "counts": [*counts, run]}


class ScriptedRng:
    """A stand-in for ``random.Random`` whose ``randint`` returns the given numbers in turn."""

    def __init__(self, draws: list[int]) -> None:
        self.draws = list(draws)

    def randint(self, a: int, b: int) -> int:
        value = self.draws.pop(0)
        assert a <= value <= b
        return value


# -- layouts ---------------------------------------------------------------------------------------------


def test_folder_layout_pairs_files_and_reads_palette_maps(tmp_path: Path) -> None:
    root = folder_set(tmp_path / "streets", {"b": stripes(12, 9)})
    palette = np.array([[0, 1, 2, 255]] * 5, dtype=np.uint8)
    write_image(root / "images" / "train" / "a.jpg", colour_image(5, 4))
    write_palette_label(root / "annotations" / "train" / "a.png", palette)
    ds = SegmentationDataset(root, "train", train=False)
    assert (ds.layout, ds.classes, ds.num_classes, ds.name, len(ds)) == ("folder", list(CLASSES), 3, "streets train", 2)
    assert not ds.reduce_zero_label
    assert [s.image.name for s in ds.samples] == ["a.jpg", "b.png"]
    np.testing.assert_array_equal(ds.load(0)[1], palette)
    np.testing.assert_array_equal(ds.load(1)[1], stripes(12, 9))


def test_ade20k_layout_reduces_the_zero_label(tmp_path: Path) -> None:
    label = np.array([[0, 1, 150, 255], [2, 0, 149, 1]], dtype=np.uint8)
    write_image(tmp_path / "images" / "training" / "ADE_train_1.jpg", colour_image(2, 4))
    write_image(tmp_path / "annotations" / "training" / "ADE_train_1.png", label)
    ds = SegmentationDataset(tmp_path, "train", train=False)
    assert (ds.layout, ds.num_classes, ds.reduce_zero_label) == ("ade20k", 150, True)
    assert (ds.classes[0], ds.classes[149]) == ("wall", "flag")
    np.testing.assert_array_equal(ds.load(0)[1], [[255, 0, 149, 255], [1, 255, 148, 0]])
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "images" / "validation"))):
        SegmentationDataset(tmp_path, "val", train=False)


def test_coco_nuclei_maps_are_the_union_of_the_instance_masks() -> None:
    ds = SegmentationDataset(NUCLEI, "train", train=False)
    assert (ds.layout, ds.classes, ds.num_classes, ds.name, len(ds)) == \
        ("coco", ["background", "nucleus"], 2, "coco-nuclei train", 3)
    for index, sample in enumerate(ds.samples):
        _, label = ds.load(index)
        union = np.zeros(label.shape, dtype=bool)
        with quiet_pycocotools():
            for ann in ds.coco.imgToAnns[sample.label]:
                union |= ds.coco.annToMask(ann).astype(bool)
        assert set(np.unique(label).tolist()) == {0, 1}
        np.testing.assert_array_equal(label == 1, union)


def test_semantic_map_orders_categories_lets_later_instances_win_and_ignores_crowds(tmp_path: Path) -> None:
    square = [[2, 2, 8, 2, 8, 8, 2, 8]]  # polygon covering pixels 2..7
    crowd = np.zeros((10, 10), dtype=np.uint8)
    crowd[0:2, 6:10] = 1
    data = {"images": [{"id": 5, "file_name": "x.png", "height": 10, "width": 10}],
            "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
            "annotations": [
                {"id": 1, "image_id": 5, "category_id": 3, "segmentation": square, "iscrowd": 0},
                {"id": 2, "image_id": 5, "category_id": 7, "iscrowd": 0,
                 "segmentation": [[5, 5, 10, 5, 10, 10, 5, 10]]},
                {"id": 3, "image_id": 5, "category_id": 3, "iscrowd": 1,
                 "segmentation": uncompressed_rle(crowd)}]}
    (tmp_path / "instances_x.json").write_text(json.dumps(data))
    label = semantic_map(load_coco(tmp_path / "instances_x.json"), 5, 10, 10)
    assert label[3, 3] == 1 and label[7, 7] == 2 and label[0, 0] == 0  # id 3 -> 1, id 7 -> 2; the later one on top
    assert (label[0:2, 6:10] == 255).all() and (label != 255).sum() == 100 - 8


# -- errors ----------------------------------------------------------------------------------------------


def test_a_missing_folder_or_split_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        SegmentationDataset(tmp_path / "nowhere", "train", train=True)
    root = folder_set(tmp_path / "set", {"a": stripes(4, 6)})
    with pytest.raises(DataError, match=re.escape(str(root / "images" / "test"))):
        SegmentationDataset(root, "test", train=False)


def test_a_label_map_of_another_size_is_named(tmp_path: Path) -> None:
    root = folder_set(tmp_path, {"a": stripes(4, 6), "b": stripes(5, 6)})
    write_image(root / "annotations" / "train" / "b.png", stripes(6, 5))
    with pytest.raises(DataError, match=re.escape(f"{root / 'annotations' / 'train' / 'b.png'} is 5x6 but")):
        SegmentationDataset(root, "train", train=True)


def test_a_colour_label_map_is_named(tmp_path: Path) -> None:
    root = folder_set(tmp_path, {"a": stripes(4, 6)})
    write_image(root / "annotations" / "train" / "a.png", colour_image(4, 6))
    with pytest.raises(DataError, match=re.escape(f"{root / 'annotations' / 'train' / 'a.png'} is a RGB image")):
        SegmentationDataset(root, "train", train=True)


def test_label_values_outside_the_classes_are_named_when_loaded(tmp_path: Path) -> None:
    root = folder_set(tmp_path, {"a": stripes(4, 6, (0, 7, 2, 9))})
    ds = SegmentationDataset(root, "train", train=True)  # values are read with the pixels, not when building
    path = root / "annotations" / "train" / "a.png"
    with pytest.raises(DataError, match=re.escape(f"{path} has label value(s) [7, 9] outside 0..2")) as err:
        ds[0]
    assert "3 classes" in str(err.value)


def test_images_and_label_maps_without_partners_are_named(tmp_path: Path) -> None:
    root = folder_set(tmp_path / "one", {"a": stripes(4, 6)})
    write_image(root / "images" / "train" / "lonely.jpg", colour_image(4, 6))
    with pytest.raises(DataError, match=r"image\(s\) without a label map .*lonely\.jpg"):
        SegmentationDataset(root, "train", train=True)
    root = folder_set(tmp_path / "two", {"a": stripes(4, 6)})
    write_image(root / "annotations" / "train" / "orphan.png", stripes(4, 6))
    with pytest.raises(DataError, match=r"label map\(s\) without an image .*orphan\.png"):
        SegmentationDataset(root, "train", train=True)


def test_an_empty_split_is_refused(tmp_path: Path) -> None:
    root = folder_set(tmp_path, {})
    with pytest.raises(DataError, match=re.escape(f"the split is empty: {root / 'images' / 'train'}")):
        SegmentationDataset(root, "train", train=True)


@pytest.mark.parametrize("text, message", [("", "is empty"), ("\n\n", "is empty"),
                                           ("sky\nroad\nsky\n", "more than once"), ("sky\n\nroad\n", ":2: blank line")])
def test_a_bad_classes_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    root = folder_set(tmp_path, {"a": stripes(4, 6)}, classes=text)
    with pytest.raises(DataError, match=re.escape(str(root / "classes.txt")) + ".*" + re.escape(message)):
        SegmentationDataset(root, "train", train=True)


def test_a_coco_set_with_a_mask_of_the_wrong_size_or_no_mask_is_named(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "x.png", colour_image(10, 12))
    data = {"images": [{"id": 1, "file_name": "x.png", "height": 10, "width": 12}],
            "categories": [{"id": 1, "name": "cell"}],
            "annotations": [{"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2],
                             "segmentation": uncompressed_rle(np.ones((12, 10), dtype=np.uint8))}]}
    annotations = tmp_path / "instances_train.json"
    annotations.write_text(json.dumps(data))
    with pytest.raises(DataError, match=re.escape(f"{annotations}: annotation 4 has an RLE mask of size [12, 10]")):
        SegmentationDataset(tmp_path, "train", train=True)
    del data["annotations"][0]["segmentation"]
    annotations.write_text(json.dumps(data))
    with pytest.raises(DataError, match=re.escape(f"{annotations}: annotation 4 has no segmentation")):
        SegmentationDataset(tmp_path, "train", train=True)
    data["images"][0]["width"] = 11
    annotations.write_text(json.dumps(data))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'images' / 'x.png'} is 12x10 but {annotations}")):
        SegmentationDataset(tmp_path, "train", train=True)


# -- the pipeline ----------------------------------------------------------------------------------------


def test_mmcv_rescale_rule_for_640x480() -> None:
    factor = min(2048 / 640, 512 / 480)  # the long edge may reach 2048, the short one 512: the short one binds
    assert (int(640 * factor + 0.5), int(480 * factor + 0.5)) == (683, 512)
    assert rescale_size((640, 480), (2048, 512)) == (683, 512)
    assert rescale_size((480, 640), (2048, 512)) == (512, 683)


def test_a_640x480_image_is_resized_to_683x512_in_training_and_at_test_time(tmp_path: Path) -> None:
    root = folder_set(tmp_path, {"a": stripes(480, 640)})
    train = SegmentationDataset(root, "train", train=True, crop_size=(520, 700), ratio_range=(1.0, 1.0), hflip=0.0)
    image, label = train[0]
    assert image.shape == (3, 520, 700) and label.shape == (520, 700)
    assert (label[:512, :683] != 255).all() and (label[512:] == 255).all() and (label[:, 683:] == 255).all()
    assert (image[:, 512:] == 0).all() and (image[:, :, 683:] == 0).all()
    image, label = SegmentationDataset(root, "train", train=False)[0]
    # evaluation items keep the original size; the test-time wrapper resizes the image to fit the test scale
    assert image.shape == (3, 480, 640) and label.shape == (480, 640)
    np.testing.assert_array_equal(label.numpy(), stripes(480, 640))
    seen = []
    tester = Predictor(lambda x: seen.append(tuple(x.shape[2:])) or torch.zeros(1, 2, *x.shape[2:]), (2048, 512))
    assert tester(image[None]).shape == (1, 2, 480, 640) and seen == [(512, 683)]


def test_training_items_have_the_crop_size_and_batch_with_the_default_collate(tmp_path: Path) -> None:
    root = folder_set(tmp_path, {"a": stripes(60, 80), "b": stripes(90, 50)})
    ds = SegmentationDataset(root, "train", train=True, crop_size=(32, 48), scale=(100, 60))
    items = [ds[i % 2] for i in range(6)]
    for image, label in items:
        assert (image.shape, label.shape) == ((3, 32, 48), (32, 48))
        assert (image.dtype, label.dtype) == (torch.float32, torch.int64)
        assert set(label.unique().tolist()) <= {0, 1, 2, 255}
    images, labels = torch.utils.data.default_collate(items)
    assert images.shape == (6, 3, 32, 48) and labels.shape == (6, 32, 48)
    assert torch.equal(SegmentationDataset.collate(items)[0], images)


def test_a_small_image_is_padded_with_zero_and_its_label_with_255(tmp_path: Path) -> None:
    label = stripes(20, 30)
    root = folder_set(tmp_path, {"a": label})
    ds = SegmentationDataset(root, "train", train=True, crop_size=(64, 64), scale=(30, 20), ratio_range=(1.0, 1.0),
                             hflip=0.0, photometric=False)
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target.shape == (64, 64)
    assert (image[:, 20:] == 0).all() and (image[:, :, 30:] == 0).all()
    assert (target[20:] == 255).all() and (target[:, 30:] == 255).all()
    np.testing.assert_array_equal(target[:20, :30].numpy(), label)
    torch.testing.assert_close(image[:, :20, :30], normalize(ds.load(0)[0]))


def test_flip_mirrors_image_and_label(tmp_path: Path) -> None:
    label = stripes(20, 30)
    root = folder_set(tmp_path, {"a": label})
    ds = SegmentationDataset(root, "train", train=True, crop_size=(20, 30), scale=(30, 20), ratio_range=None,
                             hflip=1.0, photometric=False)
    image, target = ds[0]
    np.testing.assert_array_equal(target.numpy(), label[:, ::-1])
    torch.testing.assert_close(image, normalize(ds.load(0)[0][:, ::-1]))


def test_cat_max_ratio_rejects_a_crop_dominated_by_one_class() -> None:
    label = np.zeros((10, 20), dtype=np.uint8)
    label[:, 14:] = 1  # crops of width 10 starting at 0..4 see class 0 only, at 7 a 7:3 split
    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    assert not balanced(label[:, 0:10], 0.75) and balanced(label[:, 7:17], 0.75)
    _, crop = random_crop(image, label, (10, 10), 0.75, ScriptedRng([0, 0, 0, 7]))  # (top, left) per draw
    np.testing.assert_array_equal(crop, label[:, 7:17])
    _, crop = random_crop(image, label, (10, 10), 1.0, ScriptedRng([0, 0]))  # the test off: the first draw stays
    np.testing.assert_array_equal(crop, label[:, 0:10])
    ignored = label.copy()
    ignored[:, 10:14] = 255  # ignored pixels are left out: 6 of class 0 against 3 of class 1 is still too many
    assert not balanced(ignored[:, 4:17], 0.6) and balanced(ignored[:, 4:17], 0.7)


def test_eleven_unbalanced_draws_keep_the_last() -> None:
    label = np.zeros((10, 20), dtype=np.uint8)
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    label[:, 19] = 1
    rng = ScriptedRng([v for left in range(11) for v in (0, left)])  # every crop is 9:1 or worse
    _, crop = random_crop(image, label, (10, 10), 0.75, rng)
    np.testing.assert_array_equal(crop, label[:, 10:20])
    assert rng.draws == []


def test_normalisation_uses_mmseg_mean_and_std(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    (root / "classes.txt").parent.mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    write_image(root / "images" / "val" / "x.png", np.full((48, 64, 3), (200, 100, 50)))
    write_image(root / "annotations" / "val" / "x.png", np.zeros((48, 64)))
    image, label = SegmentationDataset(root, "val", train=False)[0]
    expected = torch.tensor([(200 - 123.675) / 58.395, (100 - 116.28) / 57.12, (50 - 103.53) / 57.375])
    assert image.shape == (3, 48, 64) and label.shape == (48, 64)
    torch.testing.assert_close(image[:, 10, 30], expected)
    assert (MEAN, STD) == ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def test_hsv_follows_opencv_conventions() -> None:
    red = np.array([[[255, 0, 0]]], dtype=np.uint8)
    assert rgb_to_hsv(red).tolist() == [[[0, 255, 255]]]
    assert hsv_to_rgb(np.array([[[60, 255, 255]]], dtype=np.uint8)).tolist() == [[[0, 255, 0]]]  # 120 degrees
    assert rgb_to_hsv(np.array([[[128, 128, 128]]], dtype=np.uint8)).tolist() == [[[0, 0, 128]]]
    colours = colour_image(32, 32)
    back = hsv_to_rgb(rgb_to_hsv(colours)).astype(int)
    assert np.abs(back - colours).max() <= 5  # hue kept in 2-degree steps, as OpenCV's uint8 HSV


def test_deterministic_mode_repeats_an_item_within_an_epoch_only(tmp_path: Path) -> None:
    root = folder_set(tmp_path, {"a": stripes(60, 80)})
    ds = SegmentationDataset(root, "train", train=True, crop_size=(32, 32), scale=(100, 60))
    ds.seed = 3
    first = ds[0]
    random.random()
    assert all(torch.equal(a, b) for a, b in zip(first, ds[0]))
    ds.epoch = 1
    assert not torch.equal(first[0], ds[0][0])


def test_evaluation_items_of_different_sizes_are_not_batched(tmp_path: Path) -> None:
    root = folder_set(tmp_path, {"a": stripes(20, 30), "b": stripes(30, 20)})
    ds = SegmentationDataset(root, "train", train=False, scale=(64, 48))
    with pytest.raises(DataError, match="batch size 1"):
        SegmentationDataset.collate([ds[0], ds[1]])


def test_coco_training_items_have_the_crop_size() -> None:
    ds = SegmentationDataset(NUCLEI, "train", train=True, crop_size=(128, 128), scale=(256, 256))
    image, label = ds[0]
    assert image.shape == (3, 128, 128) and label.shape == (128, 128)
    assert set(label.unique().tolist()) <= {0, 1}


def test_a_folder_without_classes_is_not_taken_for_ade20k(tmp_path: Path) -> None:
    """Only ADE20K's own split names make a folder ADE20K; any other folder needs its classes.txt."""
    root = folder_set(tmp_path / "two", {"a": stripes(20, 30, (0, 1))}, classes=None)
    with pytest.raises(DataError, match="no classes.txt: add one class name per line"):
        SegmentationDataset(root, "train", train=False)
    ade = folder_set(tmp_path / "ade", {"a": stripes(20, 30, (0, 1))}, split="training", classes=None)
    assert SegmentationDataset(ade, "train", train=False).layout == "ade20k"
