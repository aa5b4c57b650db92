"""Photo faces turned upright by RetinaFace's eye landmarks before they are cut (issue 37)."""

import math

import cv2
import numpy as np
import pytest
from conftest import ROOT

from ferlite import detection, images

SAMPLE = ROOT / "samples" / "grace_hopper.jpg"


def eyes(roll_degrees, centre=(100.0, 100.0), apart=40.0):
    """Five landmarks whose eyes are `apart` pixels apart, rolled by `roll_degrees` (image-right eye lower)."""
    t = math.radians(roll_degrees)
    dx, dy = math.cos(t) * apart / 2, math.sin(t) * apart / 2
    cx, cy = centre
    return np.array([[cx - dx, cy - dy], [cx + dx, cy + dy], [cx, cy + 10], [cx - 10, cy + 20], [cx + 10, cy + 20]])


@pytest.mark.parametrize("roll", [-30.0, -5.0, 0.0, 12.5, 45.0])
def test_eye_roll_reads_the_angle_of_the_line_through_the_eyes(roll):
    assert detection.eye_roll(eyes(roll)) == pytest.approx(roll)


def test_no_landmarks_no_roll():
    assert detection.eye_roll(None) == 0.0


def test_a_level_face_is_cut_as_without_landmarks():
    gray = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)
    box, framing = (70, 60, 60, 80), detection.RETINAFACE_FRAMING
    plain = detection.crop_face(gray, box, 48, framing)
    assert np.array_equal(detection.crop_face(gray, box, 48, framing, eyes(0.0)), plain)
    assert np.array_equal(detection.crop_face(gray, box, 48, framing, eyes(detection.MIN_ROLL / 2)), plain)


def test_a_rolled_face_is_cut_upright():
    """A face drawn upright, then the whole image rolled about the face's centre: cut with the rolled eyes, it
    comes back as the upright cut, apart from interpolation; cut as it is, it does not."""
    gray = np.full((240, 240), 90, np.uint8)
    cv2.ellipse(gray, (120, 120), (50, 65), 0, 0, 360, 200, -1)  # the face
    for x in (100, 140):
        cv2.circle(gray, (x, 105), 7, 20, -1)  # eyes, level
    cv2.ellipse(gray, (120, 150), (20, 8), 0, 0, 180, 20, -1)  # a smile
    box, framing = (70, 55, 100, 130), detection.RETINAFACE_FRAMING
    upright = detection.crop_face(gray, box, 48, framing).astype(float)
    for roll in (-25.0, 20.0):
        # cv2 turns counter-clockwise for a positive angle: -roll puts the image-right eye lower for roll > 0
        turn = cv2.getRotationMatrix2D((120, 120), -roll, 1.0)
        rolled = cv2.warpAffine(gray, turn, (240, 240), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        points = cv2.transform(np.array([[[100, 105], [140, 105], [120, 125], [110, 150], [130, 150]]], float), turn)[0]
        assert detection.eye_roll(points) == pytest.approx(roll, abs=0.01)
        aligned = detection.crop_face(rolled, box, 48, framing, points).astype(float)
        as_is = detection.crop_face(rolled, box, 48, framing).astype(float)
        assert np.abs(aligned - upright).mean() < 4, np.abs(aligned - upright).mean()
        assert np.abs(as_is - upright).mean() > 3 * np.abs(aligned - upright).mean()


def test_retinaface_gives_each_face_its_eyes_mouth_and_nose():
    bgr = images.read_image(SAMPLE)
    found = detection.load_detector("retinaface").detect(bgr)
    assert len(found) == 1
    x, y, w, h, _, points = found[0]
    assert points.shape == (5, 2)
    assert ((points[:, 0] > x) & (points[:, 0] < x + w) & (points[:, 1] > y) & (points[:, 1] < y + h)).all()
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = points
    assert lx < nx < rx and mlx < mrx  # image-left eye and mouth corner first
    assert max(ly, ry) < ny < min(mly, mry)  # eyes above the nose, the nose above the mouth
    assert abs(detection.eye_roll(points)) < 15  # Grace Hopper's head is nearly level


def test_faces_found_near_the_border_keep_their_landmarks_in_place():
    """with_border_retry searches a padded copy: the landmarks come back in the image's own coordinates."""
    points = eyes(10.0, centre=(30.0, 40.0))
    pad = int(round(detection.PAD_RETRY * 100))

    def detect_once(image):
        if image.shape[0] == 100:
            return []  # found only in the padded copy
        return [(20 + pad, 20 + pad, 30, 40, 0.9, points + pad)]

    ((x, y, w, h, s, moved),) = detection.with_border_retry(detect_once, np.zeros((100, 100, 3), np.uint8))
    assert (x, y, w, h, s) == (20, 20, 30, 40, 0.9)
    assert np.allclose(moved, points)


def test_a_followed_face_turns_by_its_eyes_angle_averaged_over_frames():
    """Video: SteadyRoll moves each followed face's angle ROLL_EMA of the way to each frame's own."""
    from ferlite.tracking import ROLL_EMA, SteadyRoll

    steady, box = SteadyRoll(), (80.0, 70.0, 40.0, 50.0, 0.9)
    assert steady.rolls([(*box, eyes(10.0))]) == [pytest.approx(10.0)]  # a new face: its own angle
    assert steady.rolls([(*box, eyes(0.0))]) == [
        pytest.approx(10.0 * (1 - ROLL_EMA))
    ]  # one jittery frame barely moves it
    for _ in range(200):
        (roll,) = steady.rolls([(*box, eyes(0.0))])
    assert roll == pytest.approx(0.0, abs=1e-3)  # a lasting change is followed
    far = (300.0, 70.0, 40.0, 50.0, 0.9)  # a face elsewhere is another face: its own angle
    assert steady.rolls([(*box, eyes(0.0)), (*far, eyes(-20.0))]) == [
        pytest.approx(0.0, abs=1e-3),
        pytest.approx(-20.0),
    ]
    assert SteadyRoll().rolls([box]) == [0.0]  # no landmarks (Haar): not turned
    assert SteadyRoll(rate=1.0).rolls([(*box, eyes(7.0))]) == [pytest.approx(7.0)]


def test_a_given_roll_turns_the_crop_as_the_eyes_would():
    gray = cv2.cvtColor(images.read_image(SAMPLE), cv2.COLOR_BGR2GRAY)
    box, framing = (180, 90, 250, 300), detection.RETINAFACE_FRAMING
    by_eyes = detection.crop_face(gray, box, 48, framing, eyes(12.0))
    assert np.array_equal(detection.crop_face(gray, box, 48, framing, roll=12.0), by_eyes)
    assert np.array_equal(
        detection.crop_face(gray, box, 48, framing, eyes(12.0), roll=0.0), detection.crop_face(gray, box, 48, framing)
    )
