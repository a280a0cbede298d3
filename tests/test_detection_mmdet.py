"""The detector against mmdetection 2.x: anchors, resize, assigner, precision, evaluation batch, weight decay."""
from __future__ import annotations

import inspect

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.image_list import ImageList

from tokenmixers.converters import stm_eval
from tokenmixers.detection import create_detector
from tokenmixers.detection.data import rescale_size
from tokenmixers.detection.detector import MaxIoUAssigner
from tokenmixers.detection.evaluate import evaluate_checkpoint, evaluate_detector
from tokenmixers.detection.task import OFFICIAL_NO_DECAY, DetectionSettings, param_groups

from .conftest import MICRO_MODELS
from .reference import paper_entries


def test_p6_anchors_sit_on_a_stride_of_64() -> None:
    """At 800x1088 padded, P6 (13x17 cells) has mmdet's centres 0, 64, ..., 768 (torchvision's own: 0, 61, ...)."""
    with torch.device("meta"):
        detector = create_detector("unified_convnext_micro", 1)
    generator = type(detector.rpn.anchor_generator)(((32.0,), (64.0,), (128.0,), (256.0,), (512.0,)), ((0.5, 1.0, 2.0),) * 5)
    maps = [torch.zeros(1, 1, 800 // s + (800 % s > 0), 1088 // s) for s in (4, 8, 16, 32, 64)]
    anchors = generator(ImageList(torch.zeros(1, 3, 800, 1088), [(800, 1088)]), maps)[0]
    p6 = anchors[-13 * 17 * 3:]
    centres = ((p6[:, :2] + p6[:, 2:]) / 2).reshape(13, 17, 3, 2)[:, :, 0]
    assert torch.allclose(centres[:, 0, 1], torch.arange(13) * 64.0, atol=1e-4)
    assert torch.allclose(centres[0, :, 0], torch.arange(17) * 64.0, atol=1e-4)
    # mmdet's base anchor at ratio 1: a 512 px square (scale 8 x stride 64) centred on the cell
    assert torch.equal(p6[1], torch.tensor([-256.0, -256.0, 256.0, 256.0]))


def test_resize_rounds_to_nearest_as_mmcv() -> None:
    """640x480 -> 1067x800 (torchvision's rounding down gives 1066); boxes scaled per axis."""
    assert rescale_size(480, 640, 800, 1333) == (800, 1067)
    with torch.device("meta"):
        detector = create_detector("unified_convnext_micro", 1)
    transform = detector.transform.train()
    image, target = transform.resize(torch.rand(3, 480, 640), {"boxes": torch.tensor([[64.0, 48.0, 640.0, 480.0]])})
    assert image.shape == (3, 800, 1067)
    assert torch.allclose(target["boxes"], torch.tensor([[64 * 1067 / 640, 80.0, 1067.0, 800.0]]))


def test_rpn_assigner_is_mmdets() -> None:
    """A ground truth's best anchor counts only from IoU 0.3, and goes to that ground truth (mmdet's MaxIoUAssigner)."""
    iou = torch.tensor([
        [0.25, 0.10, 0.00, 0.00],  # gt 0: best anchor 0 at 0.25 < 0.3: no low-quality positive
        [0.00, 0.40, 0.35, 0.80],  # gt 1: anchor 3 positive (>= 0.7); its best is 0.8
        [0.00, 0.45, 0.38, 0.00],  # gt 2: best anchor 1 at 0.45 (>= 0.3): positive for gt 2
    ])
    ours = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3)(iou.clone())
    theirs = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou.clone())
    assert ours.tolist() == [Matcher.BELOW_LOW_THRESHOLD, 2, Matcher.BETWEEN_THRESHOLDS, 1]
    assert theirs.tolist()[0] == 0  # torchvision makes anchor 0 a positive of gt 0 at IoU 0.25
    tie = torch.tensor([[0.5, 0.2], [0.5, 0.1]])  # an anchor two ground truths share as their best: the later wins
    assert MaxIoUAssigner(0.7, 0.3, 0.3)(tie)[0] == 1


def test_fp32_and_one_image_per_batch_by_default() -> None:
    """The official configs train and test in fp32 and test one image per GPU."""
    assert DetectionSettings().precision == "fp32"
    for fn in (evaluate_detector, evaluate_checkpoint):
        assert inspect.signature(fn).parameters["batch_size"].default == 1


@pytest.mark.parametrize("name", MICRO_MODELS)
def test_weight_decay_is_the_official_configs(name: str) -> None:
    """The backbone parameters without decay are exactly those whose official names hold the config's keys."""
    with torch.device("meta"):
        detector = create_detector(name, 1)
    _, no_decay = param_groups(detector, 0.05)
    names = {id(p): n for n, p in detector.named_parameters()}
    ours = {names[id(p)].removeprefix("backbone.body.") for p in no_decay["params"] if names[id(p)].startswith("backbone.body.")}
    official = [key for key, _ in paper_entries()[name] if not key.startswith(("head.", "conv_head.", "stage_norms."))]
    official += [f"out_norm_{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    expected = {stm_eval.rename(k) for k in official if any(word in k for word in OFFICIAL_NO_DECAY)}
    assert ours == expected
    assert not any(n.startswith(("rpn.", "roi_heads.")) for n in (names[id(p)] for p in no_decay["params"]))
    _, loose = param_groups(detector, 0.05, "all_norms")
    assert len(loose["params"]) > len(no_decay["params"])  # the classification recipe's rule, kept as an option


def test_training_batches_hold_one_aspect() -> None:
    """mmdet's GroupSampler: every global batch is all landscape or all portrait, on one process or two."""
    from tokenmixers.data import EpochSampler

    flags = [1, 0, 1, 1, 0, 0, 1, 0, 1]  # 5 landscape, 4 portrait
    for world, per_process in ((1, 10), (2, 6)):
        streams = [EpochSampler(flags, rank, world, seed=3, groups=flags, block=2 * world) for rank in range(world)]
        for s in streams:
            s.set_epoch(1)
        order = [list(s) for s in streams]
        assert all(len(o) == per_process for o in order)  # each group filled up to whole blocks of 2 x world
        steps = [[i for o in order for i in o[k: k + 2]] for k in range(0, len(order[0]), 2)]
        assert all(len({flags[i] for i in step}) == 1 for step in steps)
    whole, resumed = (EpochSampler(flags, 0, 1, seed=3, groups=flags, block=2) for _ in range(2))
    whole.set_epoch(1)
    resumed.set_epoch(1, start=4)  # an interrupted epoch continues with the same order
    assert list(resumed) == list(whole)[4:] and len(resumed) == 6


def test_swin_3x_crop_policy() -> None:
    """Resize to 400/500/600, crop 384-600 per side, boxes clipped into the crop, empty ones dropped with masks."""
    import random

    from tokenmixers.detection.data import crop_policy
    from tokenmixers.detection.task import Detection

    assert Detection.load_settings("mask_rcnn_3x").crop_branch and not Detection.load_settings("mask_rcnn_1x").crop_branch
    masks = torch.zeros(2, 480, 640, dtype=torch.uint8)
    masks[0, 100:200, 100:300] = 1
    masks[1, 0:10, 630:640] = 1
    target = {"boxes": torch.tensor([[100.0, 100.0, 300.0, 200.0], [630.0, 0.0, 640.0, 10.0]]),
              "labels": torch.tensor([1, 2]), "masks": masks}
    sizes, kept = set(), set()
    for seed in range(40):
        image, out = crop_policy(torch.rand(3, 480, 640), target, random.Random(seed))
        h, w = image.shape[1:]
        assert 384 <= h <= 600 and 384 <= w <= 600 and out["masks"].shape[1:] == (h, w)
        assert (out["boxes"][:, 0::2] <= w).all() and (out["boxes"][:, 1::2] <= h).all() and (out["boxes"] >= 0).all()
        assert len(out["boxes"]) == len(out["labels"]) == len(out["masks"])
        sizes.add(h)
        kept.add(len(out["boxes"]))
    assert len(sizes) > 5 and 1 in kept  # crops of many sizes; the corner box cut away where the crop misses it
