"""Face detectors on hard scenes: recall, false detections, blur check and cost per detector.

Scenes of ``--image-size`` px (256) are built offline, with their boxes: a background (a photo
crop or a generated texture) and 2-5 faces pasted with a soft elliptic edge, each face
20-40 px (70%) or 40-80 px, rotated by up to +-30 degrees, mirrored, re-coloured (tint,
gamma, grey), and some occluded (a mask over the lower face or a bar over the eyes) or turned
(squeezed sideways, as a head turned away; the camera man is a true three-quarter view).
Face-free images are backgrounds and the face photos with their faces cut out.

Face sources, all from installed wheels: skimage's ``camera`` (a man behind a video camera, a
three-quarter view; the sample does not use it), skimage's ``astronaut`` and matplotlib's
``grace_hopper`` (the sample crops both, so these identities are in the sample) and the 100
LFW crops of skimage's ``lfw_subset`` (the sample pastes the same crops: same identities). The
scenes differ from the sample's by size (20-40 px faces in 256 px scenes, several per scene),
rotation, occlusion, turn and colour; a face of the sample never appears as it does there.

Per detector: recall at IoU >= 0.3 (all faces, and by kind: small, tilted > 15 degrees,
occluded, turned), the share of face-free images with a false detection, the blur check (the
found faces blurred as the subset blurs them, then the detector run again: detections left on
a blurred face), and CPU cost: ms per image (process CPU time), images/s per core and CPU hours
per 10k images. dlib-bin is a CPU build; no detector here uses a GPU.

    .venv/bin/python bench/faces.py --quick
    .venv/bin/python bench/faces.py                          # 60 scenes + 60 face-free
    .venv/bin/python bench/faces.py --detectors cnn,cnn_rot --scenes 100 --yunet yunet.onnx
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import matplotlib.cbook
import numpy as np
import skimage.data
from _common import environment_line, print_table, summary
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from aim_kedro.curation.blur import blur_faces  # noqa: E402
from aim_kedro.curation.faces import box_iou, for_face_size, make_detector  # noqa: E402
from aim_kedro.curation.filters import FilterConfig  # noqa: E402

Box = tuple[float, float, float, float]

# (image loader, face box x0, y0, x1, y1 in its pixels, in the sample?)
SOURCES: dict[str, tuple[Callable[[], np.ndarray], Box, bool]] = {
    "camera": (lambda: np.stack([skimage.data.camera()] * 3, -1), (180, 105, 258, 195), False),
    "astronaut": (skimage.data.astronaut, (168, 52, 282, 176), True),
    "grace_hopper": (
        lambda: np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))
                           .convert("RGB")),
        (150, 95, 385, 345), True,
    ),
}
BACKGROUNDS = ("coffee", "brick", "grass", "gravel", "rocket", "coins", "chelsea", "hubble_deep_field",
               "immunohistochemistry", "retina", "moon", "page", "text", "clock")

DETECTORS: dict[str, dict[str, Any]] = {
    "haar": {"kind": "opencv_haar"},
    "haar_profile": {"kind": "opencv_haar", "cascades": ["frontalface_alt2", "profileface"]},
    "hog": {"kind": "dlib_hog", "min_face": 20, "max_detect_size": 1280},
    "hog_rot": {"kind": "dlib_hog", "min_face": 20, "max_detect_size": 1280,
                "angles": [-25, 25]},
    "cnn": {"kind": "dlib_cnn", "min_face": 20, "max_detect_size": 1280},
    "cnn_rot": {"kind": "dlib_cnn", "min_face": 20, "max_detect_size": 1280,
                "angles": [-25, 25]},
    # a confidence cut below dlib's own 0 (backend torch only): more faces, more blobs found
    # again on blurred faces
    "cnn_low": {"kind": "dlib_cnn", "min_face": 20, "max_detect_size": 1280, "threshold": -0.4},
    # the same network run by dlib itself (the torch backend's boxes, at dlib's CPU cost)
    "cnn_dlib": {"kind": "dlib_cnn", "min_face": 20, "max_detect_size": 1280, "backend": "dlib"},
    # conf/base's kind (union: the CNN's boxes and the Haar cascade's), at this min_face
    "cnn_haar": {"kind": "union", "detectors": [
        {"kind": "dlib_cnn", "min_face": 20, "max_detect_size": 1280}, {"kind": "opencv_haar"}]},
}


@dataclass
class Face:
    box: Box
    size: float
    angle: float
    occluded: bool
    turned: bool
    source: str


@dataclass
class Scene:
    image: Image.Image
    faces: list[Face] = field(default_factory=list)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A photo crop (half) or a generated texture: smooth noise, stripes, blobs."""
    if rng.random() < 0.5:
        photo = getattr(skimage.data, str(rng.choice(BACKGROUNDS)))()
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.3, 1.0) * min(h, w))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        return cv2.resize(photo[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
    coarse = rng.uniform(0, 255, (int(rng.integers(3, 12)),) * 2 + (3,)).astype(np.float32)
    out = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size]
    out += 40 * np.sin(xx / rng.uniform(3, 30) + yy / rng.uniform(3, 30))[..., None]
    for _ in range(int(rng.integers(2, 8))):
        cv2.circle(out, (int(rng.integers(size)), int(rng.integers(size))),
                   int(rng.integers(5, size // 4)), rng.uniform(0, 255, 3).tolist(), -1)
    return np.clip(out + rng.normal(0, 6, out.shape), 0, 255).astype(np.uint8)


def _face_patch(rng: np.random.Generator, source: str, lfw: np.ndarray) -> tuple[np.ndarray, Box, bool]:
    """A context crop around one face (RGB), its face box in the crop, and whether it is in
    the sample."""
    if source == "lfw":
        face = (lfw[int(rng.integers(len(lfw)))] * 255).astype(np.uint8)
        return np.stack([face] * 3, -1), (0.0, 0.0, 25.0, 25.0), True
    load, (x0, y0, x1, y1), seen = SOURCES[source]
    image = load()
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * 1.7
    h, w = image.shape[:2]
    cx0, cy0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    cx1, cy1 = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
    return image[cy0:cy1, cx0:cx1].copy(), (x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0), seen


def _recolour(rng: np.random.Generator, patch: np.ndarray) -> np.ndarray:
    out = patch.astype(np.float32) / 255
    if rng.random() < 0.2:
        out = np.repeat(out.mean(axis=2, keepdims=True), 3, axis=2)
    out = out ** rng.uniform(0.7, 1.4) * rng.uniform(0.75, 1.1, 3)
    return np.clip(out * 255, 0, 255).astype(np.uint8)


def _occlude(rng: np.random.Generator, patch: np.ndarray, box: Box) -> None:
    """A mask over the lower face or a dark bar over the eyes, in place."""
    x0, y0, x1, y1 = box
    colour = rng.uniform(0, 255, 3).tolist()
    if rng.random() < 0.5:
        pts = np.array([[x0, y0 + 0.55 * (y1 - y0)], [x1, y0 + 0.55 * (y1 - y0)],
                        [x1 - 0.1 * (x1 - x0), y1], [x0 + 0.1 * (x1 - x0), y1]], np.int32)
        cv2.fillPoly(patch, [pts], colour)
    else:
        cv2.rectangle(patch, (int(x0), int(y0 + 0.25 * (y1 - y0))),
                      (int(x1), int(y0 + 0.45 * (y1 - y0))), [c * 0.2 for c in colour], -1)


def render_scene(rng: np.random.Generator, size: int, sources: list[str], lfw: np.ndarray) -> Scene:
    """One scene with 2-5 faces placed without overlap, and their boxes."""
    canvas = _background(rng, size).astype(np.float32)
    scene_faces: list[Face] = []
    for _ in range(int(rng.integers(2, 6))):
        source = str(rng.choice(sources))
        patch, box, _seen = _face_patch(rng, source, lfw)
        target = rng.uniform(20, 40) if rng.random() < 0.7 else rng.uniform(40, 80)
        scale = target / max(box[2] - box[0], box[3] - box[1])
        turned = source == "camera" or rng.random() < 0.15
        sx = scale * (rng.uniform(0.6, 0.75) if turned and source != "camera" else 1.0)
        patch = _recolour(rng, patch)
        occluded = rng.random() < 0.2
        if occluded:
            _occlude(rng, patch, box)
        if rng.random() < 0.5:
            patch = patch[:, ::-1].copy()
            w = patch.shape[1]
            box = (w - box[2], box[1], w - box[0], box[3])
        angle = float(rng.uniform(-30, 30))
        ph, pw = patch.shape[:2]
        matrix = cv2.getRotationMatrix2D((pw * sx / 2, ph * scale / 2), angle, 1.0)
        matrix[:, :2] = matrix[:, :2] @ np.diag([sx, scale])
        out_w, out_h = math.ceil(pw * sx), math.ceil(ph * scale)
        reach = int(math.hypot(out_w, out_h))
        # The truth box bounds the face's ellipse (inscribed in its box) once turned, as a face
        # is annotated upright around what it covers; the bounds of the turned box's corners
        # would grow by up to 37% at 30 degrees.
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 1.0]) @ matrix.T
        a, b = sx * (box[2] - box[0]) / 2, scale * (box[3] - box[1]) / 2
        t = math.radians(angle)
        half = np.array([math.hypot(a * math.cos(t), b * math.sin(t)),
                         math.hypot(a * math.sin(t), b * math.cos(t))])
        corners = np.stack([centre - half, centre + half])
        for _try in range(30):
            ox = int(rng.integers(-reach // 4, max(1, size - reach + reach // 4)))
            oy = int(rng.integers(-reach // 4, max(1, size - reach + reach // 4)))
            fx0, fy0 = corners.min(axis=0) + (ox + (reach - out_w) / 2, oy + (reach - out_h) / 2)
            fx1, fy1 = corners.max(axis=0) + (ox + (reach - out_w) / 2, oy + (reach - out_h) / 2)
            inside = fx0 >= 0 and fy0 >= 0 and fx1 <= size and fy1 <= size
            if inside and all(box_iou((fx0, fy0, fx1, fy1), f.box) == 0 for f in scene_faces):
                break
        else:
            continue
        shift = np.array([[0, 0, ox + (reach - out_w) / 2], [0, 0, oy + (reach - out_h) / 2]])
        full = matrix + shift
        alpha = np.zeros((ph, pw), np.float32)
        cv2.ellipse(alpha, (pw // 2, ph // 2), (int(pw * 0.46), int(ph * 0.48)), 0, 0, 360, 1.0, -1)
        alpha = cv2.GaussianBlur(alpha, (0, 0), max(1.0, 0.04 * pw))
        warped = cv2.warpAffine(patch.astype(np.float32), full, (size, size))
        mask = cv2.warpAffine(alpha, full, (size, size))[..., None]
        canvas = canvas * (1 - mask) + warped * mask
        scene_faces.append(Face((float(fx0), float(fy0), float(fx1), float(fy1)), target, angle,
                                occluded, turned, source))
    return Scene(Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)), scene_faces)


def face_free(rng: np.random.Generator, size: int) -> Image.Image:
    """A background, or a face photo with its face painted over by background."""
    if rng.random() < 0.25:
        name = str(rng.choice(list(SOURCES)))
        load, (x0, y0, x1, y1), _ = SOURCES[name]
        image = load().copy()
        pad = 0.35 * (x1 - x0)
        fill = cv2.resize(_background(rng, 64), (int(x1 - x0 + 2 * pad), int(y1 - y0 + 2 * pad)))
        ys, xs = int(max(0, y0 - pad)), int(max(0, x0 - pad))
        region = image[ys:ys + fill.shape[0], xs:xs + fill.shape[1]]
        region[:] = fill[:region.shape[0], :region.shape[1]]
        return Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
    return Image.fromarray(_background(rng, size))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _found(truth: Box, boxes: list[tuple[int, int, int, int]], iou: float) -> bool:
    return any(box_iou(truth, b) >= iou for b in boxes)


def evaluate(name: str, params: dict[str, Any], scenes: list[Scene], negatives: list[Image.Image],
             iou: float) -> dict[str, Any]:
    """Recall by kind, false-detection rate, blur check and CPU cost of one detector."""
    detector = make_detector(**params)
    hits: dict[str, list[int]] = {k: [0, 0] for k in ("all", "small", "tilted", "occluded", "turned")}
    start = _cpu()
    found_per_scene = []
    for scene in scenes:
        boxes = detector.detect(scene.image)
        found_per_scene.append(boxes)
        for face in scene.faces:
            hit = _found(face.box, boxes, iou)
            kinds = ["all", "small" if face.size < 28 else "", "tilted" if abs(face.angle) > 15 else "",
                     "occluded" if face.occluded else "", "turned" if face.turned else ""]
            for kind in filter(None, kinds):
                hits[kind][0] += hit
                hits[kind][1] += 1
    false_images = sum(bool(detector.detect(image)) for image in negatives)
    cpu = (_cpu() - start) / max(1, len(scenes) + len(negatives))
    left = checked = 0
    for scene, boxes in zip(scenes, found_per_scene, strict=True):
        if not boxes:
            continue
        blurred = blur_faces(scene.image, boxes, grow=0.2, sigma_factor=0.2)
        again = for_face_size(detector, min(max(b[2] - b[0], b[3] - b[1]) for b in boxes))
        after = again.detect(blurred)
        checked += len(boxes)
        left += sum(_found(b, after, iou) for b in boxes)
    row = {"detector": name, "options": _short(params),
           "recall": _rate(hits["all"]), "faces": hits["all"][1]}
    row.update({f"recall_{k}": _rate(v) for k, v in hits.items() if k != "all"})
    row.update({
        "false_rate": false_images / max(1, len(negatives)),
        "blur_left": f"{left}/{checked}",
        "ms_per_image": 1000 * cpu,
        "img_s_core": 1 / cpu if cpu else None,
        "cpu_h_per_10k": cpu * 10_000 / 3600,
    })
    return row


def nsfw_rows(images: list[Image.Image], threshold: float) -> list[dict[str, Any]]:
    """The NSFW classifier (conf/base's curation.nsfw) on benign images: the share it would
    remove at ``threshold`` and its CPU cost, at 1 and at the configured batch size."""
    from aim_kedro.curation.nsfw import NsfwClassifierConfig

    rows = []
    for batch in (1, NsfwClassifierConfig().batch_size):
        classifier = NsfwClassifierConfig(batch_size=batch).make_classifier()
        classifier.scores(images[:1])  # load the session
        start = _cpu()
        scores, labels = classifier.scores(images)
        cpu = (_cpu() - start) / max(1, len(images))
        rows.append({
            "classifier": "nudenet 320n", "batch": batch, "images": len(images),
            "removed": int((scores >= threshold).sum()),
            "false_rate": float((scores >= threshold).mean()),
            "max_score": float(scores.max()), "top_label": labels[int(scores.argmax())],
            "ms_per_image": 1000 * cpu, "cpu_h_per_10k": cpu * 10_000 / 3600,
        })
    return rows


def _rate(pair: list[int]) -> float | None:
    return pair[0] / pair[1] if pair[1] else None


def _short(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k != "kind") or "defaults"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 scenes, 6 face-free, 3 detectors")
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--face-free", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--detectors", default=",".join(DETECTORS), help=f"of {list(DETECTORS)}")
    parser.add_argument("--sources", default="camera,astronaut,grace_hopper,lfw")
    parser.add_argument("--yunet", default=None, help="a local YuNet .onnx file (adds 'yunet')")
    parser.add_argument("--iou", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nsfw-threshold", type=float,
                        default=FilterConfig().nsfw_classifier_threshold,
                        help="curation.filters.nsfw_classifier_threshold (conf/base's)")
    parser.add_argument("--no-nsfw", action="store_true", help="skip the NSFW classifier table")
    args = parser.parse_args()
    detectors = {k: DETECTORS[k] for k in args.detectors.split(",") if k}
    if args.quick:
        args.scenes, args.face_free = 6, 6
        detectors = {k: DETECTORS[k] for k in ("haar", "hog", "cnn")}
    if args.yunet:
        detectors["yunet"] = {"kind": "onnx", "path": args.yunet, "detect_size": args.image_size}
    rng = np.random.default_rng(args.seed)
    lfw = skimage.data.lfw_subset()
    sources = args.sources.split(",")
    scenes = [render_scene(rng, args.image_size, sources, lfw) for _ in range(args.scenes)]
    negatives = [face_free(rng, args.image_size) for _ in range(args.face_free)]
    print(environment_line())
    n_faces = sum(len(s.faces) for s in scenes)
    print(f"# {len(scenes)} scenes of {args.image_size} px with {n_faces} faces "
          f"({', '.join(sources)}), {len(negatives)} face-free images; recall at IoU >= {args.iou}")
    rows = []
    for name, params in detectors.items():
        rows.append(evaluate(name, params, scenes, negatives, args.iou))
        row = rows[-1]
        print(f"# {name}: recall {row['recall']:.3f}, false images {row['false_rate']:.3f}, "
              f"{row['ms_per_image']:.0f} ms/img", file=sys.stderr, flush=True)
    print_table(rows, [
        ("detector", "detector", ""), ("options", "options", ""), ("faces", "faces", "d"),
        ("recall", "recall", ".3f"), ("recall_small", "<28 px", ".3f"),
        ("recall_tilted", ">15 deg", ".3f"), ("recall_occluded", "occluded", ".3f"),
        ("recall_turned", "turned", ".3f"), ("false_rate", "false img", ".3f"),
        ("blur_left", "left after blur", ""), ("ms_per_image", "ms/img", ".0f"),
        ("img_s_core", "img/s/core", ".2f"), ("cpu_h_per_10k", "CPU h/10k", ".2f"),
    ])
    nsfw_clause = ""
    if not args.no_nsfw:
        benign = [s.image for s in scenes] + negatives
        table = nsfw_rows(benign, args.nsfw_threshold)
        print(f"# NSFW classifier on the {len(benign)} benign images above (there are no NSFW "
              f"images offline), cut at {args.nsfw_threshold}")
        print_table(table, [
            ("classifier", "classifier", ""), ("batch", "batch", "d"), ("images", "images", "d"),
            ("removed", "removed", "d"), ("false_rate", "false rate", ".3f"),
            ("max_score", "max score", ".3f"), ("top_label", "its class", ""),
            ("ms_per_image", "ms/img", ".1f"), ("cpu_h_per_10k", "CPU h/10k", ".3f"),
        ])
        last = table[-1]
        nsfw_clause = (f"; nsfw: {last['false_rate']:.1%} of {last['images']} benign images "
                       f"removed, {last['cpu_h_per_10k']:.3f} CPU h per 10k")
    best = max(rows, key=lambda r: (r["recall"] or 0, -r["false_rate"]))
    summary(
        f"faces: best recall {best['recall']:.3f} ({best['detector']}, {best['false_rate']:.1%} "
        f"face-free images with a false detection, {best['cpu_h_per_10k']:.2f} CPU h per 10k "
        f"images at {args.image_size} px); "
        + ", ".join(f"{r['detector']} {r['recall']:.3f}/{r['false_rate']:.1%}/"
                    f"{r['cpu_h_per_10k']:.2f}h" for r in rows)
        + nsfw_clause
    )


if __name__ == "__main__":
    main()
