"""The PyTorch port of dlib's MMOD face network reads the packaged weights and returns the boxes
and confidences dlib itself returns, on real photos at several sizes, on crowds of real faces
(where non-max suppression decides), on face-free scenes and on grey images; a file that is not
an MMOD network fails naming the file and the cause."""

from __future__ import annotations

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image

from aim_kedro.curation.faces_dlib import DlibCnnDetector, _import_dlib, mmod_weights
from aim_kedro.curation.faces_mmod import MmodFormatError, MmodNet


@pytest.fixture(scope="module")
def net() -> MmodNet:
    return MmodNet.from_file(mmod_weights())


@pytest.fixture(scope="module")
def dlib_net():
    return _import_dlib().cnn_face_detection_model_v1(mmod_weights())


def _dlib(model, array: np.ndarray) -> list[tuple]:
    return [
        (d.rect.left(), d.rect.top(), d.rect.width(), d.rect.height(), d.confidence)
        for d in model(np.ascontiguousarray(array), 0)
    ]


def _same(ours: list[tuple], theirs: list[tuple]) -> None:
    assert [b[:4] for b in ours] == [b[:4] for b in theirs]
    np.testing.assert_allclose([b[4] for b in ours], [b[4] for b in theirs], atol=1e-4)


def _crowd(seed: int, side: int = 400, faces: int = 12) -> np.ndarray:
    """LFW faces of 50-120 px, some overlapping, pasted into a real scene: several detections
    close together, so the non-max suppression has work to do."""
    rng = np.random.default_rng(seed)
    lfw = skimage.data.lfw_subset()
    canvas = Image.fromarray(skimage.data.coffee()).resize((side, side))
    for i in rng.choice(len(lfw), faces, replace=False):
        size = int(rng.integers(50, 121))
        face = Image.fromarray((lfw[i] * 255).astype(np.uint8)).resize((size, size)).convert("RGB")
        canvas.paste(face, tuple(int(v) for v in rng.integers(0, side - size, 2)))
    return np.asarray(canvas)


def _photos() -> list[np.ndarray]:
    hopper = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    return [skimage.data.astronaut(), np.asarray(hopper)]


def test_the_packaged_weights_parse_into_dlibs_architecture(net: MmodNet) -> None:
    kinds = [kind for kind, _ in net.ops]
    assert kinds == ["con", "affine", "relu"] * 6 + ["con"]
    assert net.options.windows == ((80, 80),)
    assert (net.stride, net.offset) == (8.0, 14.0)  # three 5x5 stride-2 cons, unpadded
    np.testing.assert_allclose(net.means, (122.782, 117.001, 104.298), atol=1e-4)


@pytest.mark.parametrize("width", [97, 192, 333, 517])
def test_real_photos_give_dlibs_boxes_and_confidences(net, dlib_net, width) -> None:
    for photo in _photos():
        height = round(width * photo.shape[0] / photo.shape[1])
        array = np.asarray(
            Image.fromarray(photo).resize((width, height), Image.Resampling.BILINEAR)
        )
        _same(net.detect(array), _dlib(dlib_net, array))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crowds_of_real_faces_give_dlibs_boxes_after_suppression(net, dlib_net, seed) -> None:
    array = _crowd(seed)
    theirs = _dlib(dlib_net, array)
    assert len(theirs) >= 3  # a real crowd, or the comparison shows little
    positive_cells = int((net.forward(net.tiled_input(array)[0]) > 0).sum())
    assert positive_cells > len(theirs)  # suppression removed candidates
    _same(net.detect(array), theirs)


def test_face_free_scenes_and_grey_images_match_dlib(net, dlib_net) -> None:
    for scene in (skimage.data.chelsea(), skimage.data.rocket()):
        _same(net.detect(scene), _dlib(dlib_net, scene))
    hopper = Image.fromarray(_photos()[1]).convert("L")
    grey = np.asarray(hopper.resize((300, round(300 * hopper.height / hopper.width))))
    theirs = _dlib(dlib_net, grey)
    assert theirs
    _same(net.detect(grey), theirs)


def test_a_lower_threshold_only_adds_boxes(net) -> None:
    array = _crowd(3)
    at_zero = net.detect(array)
    lower = net.detect(array, -1.5)
    assert len(lower) > len(at_zero)
    assert {b[:4] for b in at_zero if b[4] > 0.3} <= {b[:4] for b in lower}


def test_small_images_have_no_faces_and_too_small_ones_fail_clearly(net) -> None:
    assert net.detect(np.zeros((20, 40, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="4x40 image is too small for the MMOD network"):
        net.detect(np.zeros((4, 40, 3), np.uint8))


def test_detector_backends_agree_through_the_face_stage_api() -> None:
    photo = Image.fromarray(skimage.data.astronaut()).resize((200, 200))
    torch_boxes = DlibCnnDetector(min_face=40).detect(photo)
    assert torch_boxes
    assert torch_boxes == DlibCnnDetector(min_face=40, backend="dlib").detect(photo)


def test_a_cut_below_zero_reaches_the_detector_and_keeps_the_upright_boxes(net) -> None:
    """A negative ``threshold`` lowers the network's own cut (it is not only a filter on dlib's
    boxes above 0): the boxes above 0 stay, boxes between the cut and 0 are added."""
    crowd = Image.fromarray(_crowd(0))
    at_zero = DlibCnnDetector(min_face=80, pad=0.0).detect(crowd)
    lower = DlibCnnDetector(min_face=80, pad=0.0, threshold=-1.0).detect(crowd)
    below = [b for b in net.detect(np.asarray(crowd), -1.0) if b[4] <= 0]
    assert below, "the crowd has candidates between -1 and 0"
    assert len(lower) > len(at_zero)
    assert set(at_zero) <= set(lower)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backend": "onnx"}, "backend must be one of"),
        ({"num_threads": 0}, "num_threads must be"),
        ({"threshold": -1.2}, "threshold must be >= -1.0"),
        ({"threshold": "low"}, "threshold must be a number"),
        ({"threshold": -0.4, "backend": "dlib"}, "below dlib's own cut .* use backend torch"),
    ],
)
def test_bad_backend_options_fail_at_construction(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        DlibCnnDetector(**options)


def test_a_file_that_is_not_an_mmod_network_names_the_file(tmp_path) -> None:
    junk = tmp_path / "not_mmod.dat"
    junk.write_bytes(b"\x01\x01\x01\x0anot_a_net_" + bytes(40))
    with pytest.raises(MmodFormatError, match=r"not_mmod\.dat.*loss_mmod"):
        MmodNet.from_file(str(junk))
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(open(mmod_weights(), "rb").read()[:60_000])
    with pytest.raises(MmodFormatError, match=r"truncated\.dat: byte \d+: the file ends inside"):
        MmodNet.from_file(str(truncated))
