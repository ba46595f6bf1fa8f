"""dlib's MMOD CNN face detector run in PyTorch.

The CPU build of dlib that pip ships has no BLAS, so its convolutions are the slowest stage of
curation. This module reads the same ``mmod_human_face_detector.dat`` (dlib's own serialisation,
parsed here in Python) and reproduces dlib's inference step by step: the tiled image pyramid of
``input_rgb_image_pyramid<pyramid_down<6>>``, the con/affine/relu stack, the mapping of output
cells back to image boxes and dlib's non-max suppression, so the boxes and confidences match
``dlib.cnn_face_detection_model_v1`` (see tests/curation/test_faces_mmod.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PYRAMID_N = 6  # pyramid_down<6>: each level is 5/6 of the one above (dlib's face model)
MIN_LEVEL_HEIGHT = 5  # compute_tiled_image_pyramid_details' min_height
LAYER_TAG = re.compile(
    rb"\x01(?:\x05con_[456]|\x07bn_con2|\x08affine_2|\x07affine_|\x06relu_2|\x05relu_)"
)

Detection = tuple[int, int, int, int, float]  # left, top, width, height, confidence


def _lround(value: float) -> int:
    """std::lround: the nearest integer, halves away from zero (drectangle -> rectangle)."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


class MmodFormatError(ValueError):
    """The weights file is not a dlib MMOD network this port can run."""


class _Reader:
    """Reads dlib's serialisation (dlib/serialize.h): control-byte integers, mantissa/exponent
    floats, length-prefixed strings, '0'/'1' bools and version-2 tensors of raw float32."""

    def __init__(self, data: bytes, path: str, pos: int = 0) -> None:
        self.data, self.path, self.pos = data, path, pos

    def fail(self, what: str) -> MmodFormatError:
        return MmodFormatError(f"{self.path}: byte {self.pos}: {what}")

    def int(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("the file ends inside a number")
        control = self.data[self.pos]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise self.fail(f"not a dlib integer (control byte {control:#04x})")
        raw = self.data[self.pos + 1 : self.pos + 1 + size]
        if len(raw) != size:
            raise self.fail("the file ends inside a number")
        self.pos += 1 + size
        value = int.from_bytes(raw, "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent >= 32000:  # float_details' is_inf / is_ninf / is_nan
            return {32000: math.inf, 32001: -math.inf}.get(exponent, math.nan)
        return math.ldexp(mantissa, exponent)

    def string(self) -> str:
        size = self.int()
        text = self.data[self.pos : self.pos + size]
        self.pos += size
        return text.decode("latin-1")

    def bool(self) -> bool:
        char = self.data[self.pos : self.pos + 1]
        if char not in (b"0", b"1"):
            raise self.fail(f"not a dlib bool ({char!r})")
        self.pos += 1
        return char == b"1"

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise self.fail(f"tensor version {version}, expected 2")
        shape = tuple(self.int() for _ in range(4))
        count = math.prod(shape)
        end = self.pos + 4 * count
        if end > len(self.data):
            raise self.fail(f"the file ends inside a tensor of shape {shape}")
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos)
        self.pos = end
        return values.astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, ...]:
        version = self.int()
        if version != 1:
            raise self.fail(f"alias_tensor version {version}, expected 1")
        return tuple(self.int() for _ in range(4))


@dataclass(frozen=True)
class MmodOptions:
    """The parts of dlib's mmod_options that inference uses."""

    windows: tuple[tuple[int, int], ...]  # detector window (width, height) per output channel
    nms_iou: float
    nms_covered: float


def _read_options(reader: _Reader) -> MmodOptions:
    version = reader.int()
    if not 1 <= version <= 4:
        raise reader.fail(f"mmod_options version {version}, expected 1-4")
    if version == 1:
        windows = [(reader.int(), reader.int())]
    else:
        windows = []
        for _ in range(reader.int()):
            window_version = reader.int()
            width, height = reader.int(), reader.int()
            if window_version == 2:
                reader.string()  # the window's label
            windows.append((width, height))
    for _ in range(3):  # loss per false alarm, per missed target, truth-match IoU
        reader.float()
    nms_iou, nms_covered = reader.float(), reader.float()
    reader.float(), reader.float()  # overlaps_ignore
    if version >= 3:
        reader.pos += 1  # assume_image_pyramid, one raw byte
    if version >= 4 and reader.bool():
        raise reader.fail(
            "the network uses bounding-box regression, which this port does not run; use "
            "backend: dlib for it"
        )
    return MmodOptions(tuple(windows), nms_iou, nms_covered)


def _read_layer(reader: _Reader) -> tuple[str, Any]:
    """One con_/bn_con2/affine_/relu_ layer's details, starting at its version string."""
    tag = reader.string()
    if tag.startswith("con_"):
        params = reader.tensor().reshape(-1)
        filters, nr, nc = reader.int(), reader.int(), reader.int()
        stride_y, stride_x, pad_y, pad_x = reader.int(), reader.int(), reader.int(), reader.int()
        weight_shape = reader.alias()
        reader.alias()  # the biases' view
        for _ in range(4):
            reader.float()  # learning-rate and weight-decay multipliers
        use_bias = reader.bool() if tag in ("con_5", "con_6") else True
        if tag == "con_6" and reader.bool():
            raise reader.fail("a con_ layer with a fused relu is not supported")
        size = math.prod(weight_shape)
        if weight_shape[0] != filters or weight_shape[2:] != (nr, nc):
            raise reader.fail(f"con_ filters {weight_shape} do not match {filters}x{nr}x{nc}")
        weight = params[:size].reshape(weight_shape)
        bias = params[size : size + filters] if use_bias else np.zeros(filters, np.float32)
        return "con", (weight, bias, (stride_y, stride_x), (pad_y, pad_x))
    if tag == "bn_con2":
        params = reader.tensor().reshape(-1)
        reader.alias(), reader.alias()  # gamma and beta views into params
        reader.tensor(), reader.tensor()  # the last batch's means and inverse deviations
        running_means = reader.tensor().reshape(-1)
        running_variances = reader.tensor().reshape(-1)
        reader.int(), reader.int()  # num_updates, running_stats_window_size
        for _ in range(4):
            reader.float()
        eps = reader.float()
        k = running_means.size
        gamma = params[:k] / np.sqrt(running_variances + eps)  # affine_(const bn_&)
        return "affine", (
            gamma.astype(np.float32),
            (params[k : 2 * k] - gamma * running_means).astype(np.float32),
        )
    if tag in ("affine_", "affine_2"):
        reader.tensor()  # empty params
        gamma, beta = reader.tensor().reshape(-1), reader.tensor().reshape(-1)
        reader.int()  # mode
        if tag == "affine_2" and reader.bool():
            return "identity", None
        return "affine", (gamma, beta)
    if tag in ("relu_", "relu_2"):
        if tag == "relu_2" and reader.bool():
            return "identity", None
        return "relu", None
    raise reader.fail(f"layer {tag!r} is not part of an MMOD face network")


class MmodNet:
    """dlib's ``loss_mmod<con<...>>`` face network in PyTorch (float32, CPU or GPU)."""

    def __init__(
        self,
        layers: list[tuple[str, Any]],
        options: MmodOptions,
        means: tuple[float, float, float],
        padding: tuple[int, int],
        path: str = "<memory>",
    ) -> None:
        self.options, self.means, self.path = options, means, path
        self.padding, self.outer_padding = padding
        self.ops: list[tuple[str, Any]] = []
        channels, scale, offset = 3, 1.0, 0.0
        for kind, value in layers:
            if kind == "con":
                weight, bias, stride, pad = value
                if weight.shape[1] != channels:
                    raise MmodFormatError(
                        f"{path}: a con_ layer takes {weight.shape[1]} channels but gets {channels}"
                    )
                channels = weight.shape[0]
                self.ops.append(
                    (
                        "con",
                        (
                            torch.from_numpy(weight.copy()),
                            torch.from_numpy(bias.copy()),
                            stride,
                            pad,
                        ),
                    )
                )
                # map_output_to_input: p*stride - padding + filter/2, composed from the input side
                offset += scale * (weight.shape[2] // 2 - pad[0])
                scale *= stride[0]
            elif kind == "affine":
                gamma, beta = value
                self.ops.append(
                    (
                        "affine",
                        (
                            torch.from_numpy(gamma.reshape(1, -1, 1, 1).copy()),
                            torch.from_numpy(beta.reshape(1, -1, 1, 1).copy()),
                        ),
                    )
                )
            elif kind == "relu":
                self.ops.append(("relu", None))
        if channels != len(options.windows):
            raise MmodFormatError(
                f"{path}: the network outputs {channels} channels for {len(options.windows)} "
                "detector windows"
            )
        self.stride, self.offset = scale, offset

    @classmethod
    def from_file(cls, path: str) -> MmodNet:
        """Parse a dlib ``loss_mmod`` network with an ``input_rgb_image_pyramid`` input."""
        with open(path, "rb") as handle:
            data = handle.read()
        reader = _Reader(data, path)
        reader.int()  # add_loss_layer's version
        if reader.string() != "loss_mmod_":
            raise reader.fail("not a dlib loss_mmod network (no 'loss_mmod_' at the start)")
        options = _read_options(reader)
        start = data.find(b"input_rgb_image_pyramid", reader.pos)
        if start < 2:
            raise reader.fail("no input_rgb_image_pyramid layer (an RGB MMOD network is needed)")
        reader.pos = start - 2  # its length prefix
        version = reader.string()
        means = (reader.float(), reader.float(), reader.float())
        padding = (
            (reader.int(), reader.int()) if version == "input_rgb_image_pyramid2" else (10, 11)
        )
        layers = []
        while (found := LAYER_TAG.search(data, reader.pos)) is not None:
            reader.pos = found.start()
            layers.append(_read_layer(reader))
        if not layers or layers[-1][0] != "con":
            raise MmodFormatError(f"{path}: no con_ layer ends the network")
        return cls(layers, options, means, padding, path)

    def pyramid_rects(
        self, rows: int, cols: int
    ) -> tuple[list[tuple[int, int, int, int]], int, int]:
        """The tiled pyramid's level rectangles (left, top, right, bottom, inclusive) and its
        size, as dlib's compute_tiled_image_pyramid_details lays them out."""
        sizes = [(cols, rows)]
        nr, nc = rows, cols
        while True:
            nr, nc = (
                math.floor((PYRAMID_N - 1) / PYRAMID_N * nr),
                math.floor((PYRAMID_N - 1) / PYRAMID_N * nc),
            )
            if nr * nc == 0 or nr < MIN_LEVEL_HEIGHT:
                break
            sizes.append((nc, nr))
        pad, outer = self.padding, self.outer_padding
        total = sum(h + pad for _, h in sizes) - 2 * pad
        height, prev_width = 0, 0
        for w, h in sizes:
            if (
                w <= sizes[0][0] - prev_width - pad
                and (height - sizes[0][1]) * 2 >= total - sizes[0][1]
            ):
                break
            height += h + pad
            prev_width = w
        height -= pad
        width = sizes[0][0]
        rects: list[tuple[int, int, int, int]] = []
        y, i = outer, 0
        while y < height + outer and i < len(sizes):
            w, h = sizes[i]
            rects.append((outer, y, outer + w - 1, y + h - 1))
            y += h + pad
            i += 1
        y -= pad
        while i < len(sizes):
            w, h = sizes[i]
            right, bottom = outer + width - 1, y - 1
            rect = (right - (w - 1), bottom - (h - 1), right, bottom)
            first = rects[0]
            if max(rect[0], first[0]) <= min(rect[2], first[2]) and max(rect[1], first[1]) <= min(
                rect[3], first[3]
            ):
                break
            rects.append(rect)
            y -= h + pad
            i += 1
        return rects, height + 2 * outer, width + 2 * outer

    def tiled_input(
        self, image: np.ndarray
    ) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """The (1, 3, NR, NC) input tensor: the image less dlib's channel means over 256, and
        each smaller level resized bilinearly (corners aligned) from the one above."""
        rows, cols = image.shape[:2]
        rects, nr, nc = self.pyramid_rects(rows, cols)
        data = torch.zeros(1, 3, nr, nc)
        if not rects:
            return data, rects
        pixels = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)
        means = torch.tensor(self.means, dtype=torch.float32).view(3, 1, 1)
        left, top, right, bottom = rects[0]
        data[0, :, top : bottom + 1, left : right + 1] = (pixels - means) / 256.0
        for (l0, t0, r0, b0), (l1, t1, r1, b1) in pairwise(rects):
            source = data[:, :, t0 : b0 + 1, l0 : r0 + 1]
            data[:, :, t1 : b1 + 1, l1 : r1 + 1] = F.interpolate(
                source, size=(b1 - t1 + 1, r1 - l1 + 1), mode="bilinear", align_corners=True
            )
        return data, rects

    @torch.no_grad()
    def forward(self, data: torch.Tensor) -> torch.Tensor:
        """The network's score map, (1, windows, rows, cols)."""
        for kind, value in self.ops:
            if kind == "con":
                weight, bias, stride, pad = value
                data = F.conv2d(data, weight, bias, stride=stride, padding=pad)
            elif kind == "affine":
                data = torch.addcmul(value[1], data, value[0])
            else:
                data = torch.relu_(data)
        return data

    def _to_image(
        self, rects: list[tuple[int, int, int, int]], box: tuple[float, ...]
    ) -> tuple[int, int, int, int]:
        """tiled_pyramid_to_image, then the conversion to dlib's integer rectangle."""
        left, top, right, bottom = box
        cx, cy = math.floor((left + right) / 2 + 0.5), math.floor((top + bottom) / 2 + 0.5)
        best, best_dist = 0, math.inf
        for i, (rl, rt, rr, rb) in enumerate(rects):  # nearest_rect
            if rl <= cx <= rr and rt <= cy <= rb:
                best = i
                break
            dist = math.hypot(cx - min(max(cx, rl), rr), cy - min(max(cy, rt), rb))
            if dist < best_dist:
                best, best_dist = i, dist
        ox, oy = rects[best][0], rects[best][1]
        coords = [left - ox, top - oy, right - ox, bottom - oy]
        for _ in range(best):  # pyramid_down<N>::point_up, once per level
            coords = [c * PYRAMID_N / (PYRAMID_N - 1.0) + 0.3 for c in coords]
        left, top, right, bottom = (_lround(c) for c in coords)
        return left, top, right, bottom

    def _overlaps(self, a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
        """dlib's test_box_overlap on integer rectangles (its 'outer' is the bounding box)."""
        iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
        ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
        if iw <= 0 or ih <= 0:
            return False
        inner = float(iw * ih)
        outer = (max(a[2], b[2]) - min(a[0], b[0]) + 1) * (max(a[3], b[3]) - min(a[1], b[1]) + 1)
        area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
        area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
        covered = self.options.nms_covered
        return (
            inner / outer > self.options.nms_iou
            or inner / area_a > covered
            or inner / area_b > covered
        )

    def detect(self, image: np.ndarray, adjust_threshold: float = 0.0) -> list[Detection]:
        """Faces in an RGB (or grey) uint8 image: (left, top, width, height, confidence), best
        first, as dlib's ``cnn_face_detection_model_v1(image, 0)`` returns them."""
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"MMOD detection needs an RGB or grey image, got shape {image.shape}")
        data, rects = self.tiled_input(image)
        if not rects:
            return []
        try:
            scores = self.forward(data)[0].numpy()
        except RuntimeError as exc:  # a pyramid smaller than a filter, as dlib also refuses
            raise ValueError(
                f"a {image.shape[0]}x{image.shape[1]} image is too small for the MMOD network: {exc}"
            ) from exc
        found = []
        for k, (width, height) in enumerate(self.options.windows):
            rows, cols = np.nonzero(scores[k] > adjust_threshold)
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                px, py = c * self.stride + self.offset, r * self.stride + self.offset
                half_w, half_h = (width - 1) / 2, (height - 1) / 2
                box = self._to_image(rects, (px - half_w, py - half_h, px + half_w, py + half_h))
                found.append((float(scores[k, r, c]), box))
        found.sort(key=lambda item: item[0], reverse=True)
        kept: list[tuple[float, tuple[int, int, int, int]]] = []
        for score, box in found:
            if not any(self._overlaps(other, box) for _, other in kept):
                kept.append((score, box))
        return [(b[0], b[1], b[2] - b[0] + 1, b[3] - b[1] + 1, score) for score, b in kept]


__all__ = ["Detection", "MmodFormatError", "MmodNet", "MmodOptions"]
