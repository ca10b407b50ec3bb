"""OpenPose skeleton renderer: a pose JSON (OpenPose's output format as the extension and the
sd-webui-openpose-editor write it) drawn as the extension's ``annotator/openpose``: ``decode_json_as_poses``,
``draw_poses`` and ``util.draw_bodypose`` / ``draw_handpose`` / ``draw_facepose``. Detecting a pose in a photo
needs the OpenPose / DWPose network weights and is not done here."""

from __future__ import annotations

import colorsys
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from sumie.errors import ConfigError

# util.draw_bodypose: COCO-18 limbs (1-based keypoint numbers) and the 18 colours, RGB
LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18))
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
STICK_WIDTH = 4
LIMB_SCALE = 0.6  # limbs are drawn in int(colour * 0.6) on the black canvas
# util.draw_handpose: 20 bones of the 21-point hand, rainbow colours hsv(i / 20, 1, 1)
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
EPS = 0.01
BODY_POINTS, HAND_POINTS = 18, 21
FIELDS = ("pose_keypoints_2d", "hand_left_keypoints_2d", "hand_right_keypoints_2d", "face_keypoints_2d")

Point = tuple[float, float] | None


@dataclass(frozen=True)
class Person:
    """One person's keypoints (None: missing, or confidence below the cut); a part is None when the JSON has none."""

    body: list[Point] | None
    left_hand: list[Point] | None
    right_hand: list[Point] | None
    face: list[Point] | None


def hand_color(i: int) -> tuple[float, float, float]:
    """Bone ``i``'s colour: ``matplotlib.colors.hsv_to_rgb([i / 20, 1, 1]) * 255`` (cv2 rounds it)."""
    return tuple(255.0 * c for c in colorsys.hsv_to_rgb(i / float(len(HAND_EDGES)), 1.0, 1.0))  # type: ignore


def load_pose(source: dict | str | os.PathLike) -> dict:
    """A pose JSON as a dict: a dict as is, a path to a ``.json`` file, or JSON text."""
    if isinstance(source, dict):
        return source
    text: str
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith(("{", "["))):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"pose JSON {str(path)!r}: file not found; check the path") from None
        except UnicodeDecodeError:
            raise ConfigError(f"pose JSON {str(path)!r}: not a text file; pass the .json the pose editor or OpenPose "
                              "wrote (a pose image you already have goes through 'none')") from None
        except OSError as e:
            raise ConfigError(f"pose JSON {str(path)!r}: cannot be read ({e}); pass a UTF-8 .json file") from None
        where = repr(str(path))
    else:
        text, where = str(source), "text"
    try:
        pose = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"pose JSON {where}: not valid JSON ({e.msg} at line {e.lineno}); pass the file the pose "
                          "editor or OpenPose wrote") from None
    if isinstance(pose, list) and len(pose) == 1 and isinstance(pose[0], dict):
        pose = pose[0]  # editors that export a one-frame batch
    if not isinstance(pose, dict):
        raise ConfigError(f"pose JSON {where}: expected an object with 'people', 'canvas_width' and 'canvas_height'")
    return pose


def _keypoints(person: dict, i: int, name: str, count: int | None, cut: float) -> tuple[list[Point] | None, int]:
    """``decompress_keypoints``: [x, y, c] triples -> points, None where ``c < cut``; also how many points had
    ``0 < c < cut`` (dropped detections)."""
    numbers = person.get(name)
    if not numbers:
        return None, 0
    where = f"people[{i}].{name}"
    if not isinstance(numbers, list) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                 for v in numbers):
        raise ConfigError(f"pose JSON: {where} must be a list of numbers [x, y, confidence, ...]")
    if len(numbers) % 3:
        raise ConfigError(f"pose JSON: {where} has {len(numbers)} numbers, not a multiple of 3 (x, y, confidence)")
    if not all(math.isfinite(v) for v in numbers):
        raise ConfigError(f"pose JSON: {where} holds NaN or infinite numbers")
    n = len(numbers) // 3
    if count is not None and n != count:
        hint = " (OpenPose's BODY_25 model; export COCO-18 keypoints)" if name == FIELDS[0] and n == 25 else ""
        raise ConfigError(f"pose JSON: {where} has {n} keypoints{hint}; the ControlNet skeleton has {count}")
    triples = [numbers[3 * k:3 * k + 3] for k in range(n)]
    dropped = sum(1 for _, _, c in triples if 0 < c < cut)
    return [(float(x), float(y)) if c >= cut else None for x, y, c in triples], dropped


def parse_pose(pose: dict, *, min_confidence: float = 1.0) -> tuple[list[Person], int | None, int | None, int]:
    """``decode_json_as_poses``: the people, canvas width and height (None when absent) and the number of points
    dropped for a confidence in (0, min_confidence). The extension keeps a point when its confidence is >= 1."""
    people = pose.get("people")
    if not isinstance(people, list):
        raise ConfigError("pose JSON: no 'people' list; expected OpenPose's format {'people': [{'pose_keypoints_2d': "
                          "[x, y, c, ...]}], 'canvas_width': W, 'canvas_height': H}")
    if pose.get("animals"):
        raise ConfigError("pose JSON: 'animals' (animal poses) are not drawn; remove them or leave the list empty")
    sizes: list[int | None] = []
    for name in ("canvas_width", "canvas_height"):
        v = pose.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                              or int(v) < 1):
            raise ConfigError(f"pose JSON: {name} must be a positive number of pixels, got {v!r}")
        sizes.append(None if v is None else int(v))
    out, dropped = [], 0
    for i, person in enumerate(people):
        if not isinstance(person, dict):
            raise ConfigError(f"pose JSON: people[{i}] must be an object with 'pose_keypoints_2d'")
        parts = []
        for name, count in zip(FIELDS, (BODY_POINTS, HAND_POINTS, HAND_POINTS, None), strict=True):
            points, n = _keypoints(person, i, name, count, min_confidence)
            parts.append(points)
            dropped += n
        out.append(Person(*parts))
    return out, sizes[0], sizes[1], dropped


def _scale(points: list[Point], canvas: np.ndarray) -> tuple[float, float]:
    """``util.is_normalized``: (W, H) of the canvas when every present point has |x|, |y| <= 1, else (1, 1)
    (pixel coordinates). Decided per part: body, each hand and the face separately."""
    present = [p for p in points if p is not None]
    if present and all(abs(x) <= 1 and abs(y) <= 1 for x, y in present):
        return float(canvas.shape[1]), float(canvas.shape[0])
    return 1.0, 1.0


def draw_body(canvas: np.ndarray, points: list[Point]) -> None:
    """``util.draw_bodypose``: each limb a filled ellipse (half-axes length / 2 and 4, at the limb's angle) in
    ``int(colour * 0.6)``, then each keypoint a filled circle of radius 4 in its colour."""
    w, h = _scale(points, canvas)
    for (k1, k2), color in zip(LIMBS, COLORS, strict=False):
        p1, p2 = points[k1 - 1], points[k2 - 1]
        if p1 is None or p2 is None:
            continue
        xs, ys = np.array([p1[0], p2[0]]) * w, np.array([p1[1], p2[1]]) * h
        length = float(((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5)
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH), int(angle),
                                   0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * LIMB_SCALE) for c in color])
    for point, color in zip(points, COLORS, strict=False):
        if point is not None:
            cv2.circle(canvas, (int(point[0] * w), int(point[1] * h)), 4, color, thickness=-1)


def draw_hand(canvas: np.ndarray, points: list[Point] | None) -> None:
    """``util.draw_handpose``: bones as 2-pixel lines in rainbow colours, joints as blue circles of radius 4; a bone
    or joint with a pixel coordinate <= 0.01 (at the canvas edge) is skipped."""
    if not points:
        return
    w, h = _scale(points, canvas)
    for i, (e1, e2) in enumerate(HAND_EDGES):
        p1, p2 = points[e1], points[e2]
        if p1 is None or p2 is None:
            continue
        x1, y1, x2, y2 = int(p1[0] * w), int(p1[1] * h), int(p2[0] * w), int(p2[1] * h)
        if x1 > EPS and y1 > EPS and x2 > EPS and y2 > EPS:
            cv2.line(canvas, (x1, y1), (x2, y2), hand_color(i), thickness=2)
    for point in points:
        if point is not None:
            x, y = int(point[0] * w), int(point[1] * h)
            if x > EPS and y > EPS:
                cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)


def draw_face(canvas: np.ndarray, points: list[Point] | None) -> None:
    """``util.draw_facepose``: each face point a white filled circle of radius 3 (skipped at the canvas edge)."""
    if not points:
        return
    w, h = _scale(points, canvas)
    for point in points:
        if point is not None:
            x, y = int(point[0] * w), int(point[1] * h)
            if x > EPS and y > EPS:
                cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)


def openpose(image: Image.Image | None, *, pose: Any = None, width: int | None = None, height: int | None = None,
             min_confidence: float = 1.0, body: bool = True, hands: bool = True, face: bool = True) -> np.ndarray:
    """``draw_poses`` of a pose JSON (dict, path or JSON text) on a black canvas -> uint8 [H, W, 3]; person by person:
    body, left hand, right hand, face. The canvas is the JSON's canvas_width x canvas_height, else ``width`` x
    ``height``, else ``image``'s size. A point counts when its confidence is >= ``min_confidence`` (the extension:
    1; OpenPose's own detections have confidences below 1, pass e.g. 0.05 for them)."""
    if pose is None:
        raise ConfigError("openpose draws a pose JSON: pass pose=FILE_OR_DICT (a pose image you already have goes "
                          "through 'none')")
    if not 0 < float(min_confidence) <= 1:
        raise ConfigError(f"openpose: min_confidence must be in (0, 1], got {min_confidence}")
    people, cw, ch, dropped = parse_pose(load_pose(pose), min_confidence=float(min_confidence))
    w = cw or width or (image.width if image is not None else None)
    h = ch or height or (image.height if image is not None else None)
    if not w or not h:
        missing = " and ".join(n for n, v in (("canvas_width", w), ("canvas_height", h)) if not v)
        raise ConfigError(f"pose JSON: no {missing} (OpenPose's own output has none); pass the canvas size "
                          "(width= / height=, --width / --height)")
    drawn = sum(p is not None for person in people for part in (person.body, person.left_hand, person.right_hand,
                                                                 person.face) for p in (part or []))
    if drawn == 0 and dropped:
        raise ConfigError(f"pose JSON: all {dropped} keypoints have a confidence below {min_confidence:g} and none is "
                          "drawn; for OpenPose's detections pass a lower cut (min_confidence=0.05, --min-confidence)")
    canvas = np.zeros((int(h), int(w), 3), np.uint8)
    for person in people:
        if body and person.body is not None:
            draw_body(canvas, person.body)
        if hands:
            draw_hand(canvas, person.left_hand)
            draw_hand(canvas, person.right_hand)
        if face:
            draw_face(canvas, person.face)
    return canvas
