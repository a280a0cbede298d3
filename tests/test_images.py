"""Reading images (16-bit files) and drawing detections legibly, with real image files."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmixers import data, drawing
from tokenmixers.detection import predict
from tokenmixers.detection.data import CocoDetection

# -- 16-bit images --------------------------------------------------------------------------------------


def gradient16(path: Path) -> np.ndarray:
    """Write a 16-bit greyscale PNG whose values span 0..65535; return the 8-bit values it should read as."""
    values = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (32, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # what PIL gives back for a 16-bit greyscale PNG
    return np.rint(values / 257).astype(np.uint8)


def test_16bit_png_is_scaled_not_clipped_by_the_training_data(tmp_path: Path) -> None:
    expected = gradient16(tmp_path / "train" / "grey" / "gradient.png")
    dataset = data.build_dataset(str(tmp_path), "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converted, not skipped as unreadable
        image, label = dataset[0]
    array = np.asarray(image)
    assert image.mode == "RGB" and label == 0
    assert array.mean() == pytest.approx(127.5, abs=0.5) and array.std() > 70  # not solid white (255, 0)
    assert (array == expected[..., None]).all()


def test_16bit_png_is_scaled_by_the_detection_readers(tmp_path: Path) -> None:
    expected = gradient16(tmp_path / "images" / "gradient.png") / 255.0
    tensor = predict.read_image(tmp_path / "images" / "gradient.png")
    assert tensor.shape == (3, 32, 256) and np.allclose(tensor.numpy(), expected[None], atol=1e-6)
    coco = {"images": [{"id": 1, "file_name": "gradient.png", "height": 32, "width": 256}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10], "area": 200}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "instances_val.json").write_text(json.dumps(coco))
    image, _ = CocoDetection(tmp_path, "val")[0]
    assert np.allclose(image.numpy(), expected[None], atol=1e-6)


def test_images_that_cannot_be_converted_faithfully_are_refused(tmp_path: Path) -> None:
    floats = tmp_path / "floats.tif"
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(floats)
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.full((8, 8), 70_000, dtype=np.int32)).save(wide)
    for path, reason in ((floats, "floating-point"), (wide, "outside 0..65535")):
        with pytest.raises(data.DataError, match=reason) as err:
            data.open_rgb(path)
        assert str(path) in str(err.value)
    assert np.asarray(data.open_rgb(Image.new("P", (4, 4), 3))).shape == (4, 4, 3)  # 8-bit modes as before
    dataset = data.ImageDataset([data.Sample(floats, 0)], ["x"])
    with pytest.warns(UserWarning, match="skipping unreadable image .*floating-point"):
        assert dataset[0] is None  # skipped and counted, like an undecodable file


# -- drawn detections -----------------------------------------------------------------------------------

NUCLEI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-nuclei"


def test_detections_are_drawn_with_a_legend_and_legible_labels() -> None:
    info = json.loads((NUCLEI / "instances_val.json").read_text())["images"][0]
    image = predict.read_image(NUCLEI / "images" / info["file_name"])
    _, H, W = image.shape
    boxes = torch.tensor([[150.0, 150, 180, 175], [200, 190, 230, 220], [226, 230, 256, 256], [155, 210, 185, 240]])
    masks = torch.zeros(4, 1, H, W)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[:, y0 + 3:y1 - 3, x0 + 3:x1 - 3] = 0.9
    output = {"boxes": boxes, "labels": torch.tensor([1, 1, 1, 1]), "scores": torch.tensor([0.91, 0.84, 0.7, 0.3]),
              "masks": masks}
    drawn = predict.draw_detections(image, output, ["nucleus"], score_threshold=0.5)
    plain = (image * 255).to(torch.uint8)
    assert drawn.shape == plain.shape and drawn.dtype == torch.uint8
    # the detections lie bottom right, so the legend goes top left; it changes that corner, nothing else does
    assert (drawn[:, :12, :40].int() - plain[:, :12, :40].int()).abs().float().mean() > 20
    assert (drawn[:, 60:120, 60:120] == plain[:, 60:120, 60:120]).all()
    assert predict.legend_lines(["nucleus"] * 37 + ["cell"]) == [("nucleus", "nucleus: 37"), ("cell", "cell: 1")]
    assert predict.label_text("nucleus", 0.8449) == "nucleus 0.84"


def test_labels_stay_inside_the_image_and_do_not_pile_up() -> None:
    boxes = [[236.0, 0, 256, 14], [0, 240, 20, 256], [100, 100, 120, 120], [236, 2, 256, 16], [101, 101, 121, 121]]
    placed = predict.place_labels(boxes, [(70, 14)] * 5, (256, 200))
    for rect in placed[:3]:
        x0, y0, x1, y1 = rect
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 200 and (x1 - x0, y1 - y0) == (70, 14)
    assert placed[2] == (100, 86, 170, 100)  # above its box, at its left edge
    assert placed[3] is None and placed[4] is None  # would cover an earlier (higher-scoring) label


# -- output files of detect predict ---------------------------------------------------------------------


def test_every_input_gets_its_own_output_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    names = lambda images: [p.name for p in drawing.output_paths(images, out)]  # noqa: E731
    assert names(["a/x.png", "a/y.jpg"]) == ["x_detections.png", "y_detections.png"]  # unique stems: as before
    assert names(["x.png", "x.jpg", "y.png"]) == ["x_png_detections.png", "x_jpg_detections.png", "y_detections.png"]
    assert names(["a/x.png", "b/x.png"]) == ["a_x_png_detections.png", "b_x_png_detections.png"]
    assert names(["p/a/x.png", "q/a/x.png"]) == ["p_a_x_png_detections.png", "q_a_x_png_detections.png"]
    assert names(["x.png", "x.png"]) == ["x_detections.png", "x_detections_2.png"]  # the same file twice
    assert names(["x.png", "x.jpg", "x.png"]) == ["x_png_detections.png", "x_jpg_detections.png",
                                                  "x_png_detections_2.png"]
    assert names(["x.png", "X.png"]) == ["x_detections.png", "X_detections_2.png"]  # one file where case is ignored
    assert drawing.output_paths(["a/x.png", "b/x.png"], out)[0].parent == out
    assert drawing.output_paths(["x.png"], tmp_path / "drawn.png") == [tmp_path / "drawn.png"]
    assert drawing.output_paths(["x.png"], out) == [out / "x_detections.png"]


def test_an_image_too_large_to_read_safely_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PIL's decompression-bomb guard raised a bare error in a loader worker (not a skippable one), naming no file
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is more than twice the limit: refused by PIL
    with pytest.raises(data.DataError, match=rf"{path} is too large to read safely .*MAX_IMAGE_PIXELS"):
        data.open_rgb(path)
    dataset = data.ImageDataset([data.Sample(path, 0)], ["x"])
    with pytest.warns(UserWarning, match="skipping unreadable image .*huge.png: .* too large to read safely"):
        assert dataset[0] is None
