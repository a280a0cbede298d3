"""Reading images (16-bit files) and drawing detections legibly, with real image files."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenmixers import data
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
