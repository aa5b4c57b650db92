"""The shared module: class names, the model, preprocessing and checkpoints."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint
from torchvision.datasets.folder import find_classes

from ferlite import detection, files, images, names, onnx_model, scoring
from ferlite.errors import UserError
from ferlite.names import EMOTIONS
from ferlite.training import checkpoints, network


def test_fer2013_ids_and_model_order_meet_in_one_mapping(tmp_path):
    """A CSV's ids are EMOTIONS' order, a model's outputs ImageFolder's: fer2013_ids and model_labels translate."""
    assert EMOTIONS[0] == "anger" and EMOTIONS[3] == "happy" and EMOTIONS[6] == "neutral" and len(EMOTIONS) == 7
    for name in EMOTIONS:
        (tmp_path / name).mkdir()
    classes, _ = find_classes(str(tmp_path))  # the order train.py's model outputs come in
    assert classes != list(EMOTIONS)  # the two orders differ, so a reader that skips the mapping is caught
    ids = names.fer2013_ids(classes)
    assert [EMOTIONS[i] for i in ids] == classes
    shares = np.eye(7, dtype=np.float32)[[3, 0]]  # FER2013 order: a happy face, an angry one
    assert [classes[k] for k in shares[:, ids].argmax(1)] == ["happy", "anger"]
    labels = names.model_labels([EMOTIONS[i] for i in (3, 0, 5)], classes, "x")
    assert [classes[k] for k in labels] == ["happy", "anger", "surprise"]
    with pytest.raises(UserError, match=r"^x\{1\}.csv has emotion 'smile' that the model lacks$"):
        names.model_labels(["happy", "smile"], classes, "x{1}.csv has emotion {emotion} that the model lacks")


@pytest.mark.parametrize("n", [1, 5])
def test_model_output_shape(n):
    model = network.build_model("EmotionNet", {"widths": [8, 16, 16, 32], "blocks": [1, 1, 1, 1]}, 7)
    assert model(torch.zeros(n, 1, 48, 48)).shape == (n, 7)


def test_unknown_architecture():
    with pytest.raises(UserError, match="unknown architecture"):
        network.build_model("Nope", {}, 7)


def test_to_input_normalises():
    x = network.to_input(np.full((2, 48, 48), 255, dtype=np.uint8), mean=0.5, std=0.25)
    assert x.shape == (2, 1, 48, 48) and torch.allclose(x, torch.full_like(x, 2.0))


@pytest.mark.parametrize("shift", [0.25, 0.5, 0.8])
def test_subpixel_shift_is_bilinear_resampling_at_that_offset(shift):
    """The same numbers as grid_sample, the resampling train.py's augmentation uses, at a fixed offset."""
    import torch.nn.functional as F

    x = torch.randn(3, 1, 48, 48)
    theta = torch.tensor([[1.0, 0, 2 * shift / 48], [0, 1.0, 2 * shift / 48]]).expand(3, 2, 3)
    grid = F.affine_grid(theta, [3, 1, 48, 48], align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    got = network.subpixel_shift(x, shift)
    assert got.shape == x.shape and torch.allclose(got, expected, atol=1e-4)  # grid_sample rounds its grid
    assert torch.allclose(
        got[0, 0, 10, 10],
        (1 - shift) ** 2 * x[0, 0, 10, 10]
        + shift * (1 - shift) * (x[0, 0, 10, 11] + x[0, 0, 11, 10])
        + shift**2 * x[0, 0, 11, 11],
        atol=1e-5,
    )
    assert network.subpixel_shift(x, 0) is x


def test_predict_proba_rows_sum_to_one():
    model = network.build_model("EmotionNet", {"widths": [8, 8, 8, 8]}, 7)
    p = network.predict_proba(model, np.zeros((3, 48, 48), np.uint8), torch.device("cpu"))
    assert p.shape == (3, 7) and torch.allclose(p.sum(1), torch.ones(3), atol=1e-3)


def test_predict_both_is_plain_and_mirror_averaged():
    torch.manual_seed(0)
    model = network.build_model("EmotionNet", {"widths": [8, 8, 8, 8]}, 7)
    faces = np.random.default_rng(1).integers(0, 256, (70, 48, 48), dtype=np.uint8)  # two batches of 64
    plain, averaged = network.predict_both(model, faces, torch.device("cpu"), bf16=False)
    assert torch.allclose(plain, network.predict_proba(model, faces, torch.device("cpu"), bf16=False, tta=False))
    assert torch.allclose(averaged, network.predict_proba(model, faces, torch.device("cpu"), bf16=False, tta=True))
    assert not torch.allclose(plain, averaged)  # the mirror image changes the answer of a random net


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_predict_proba_averages_each_face_with_its_own_mirror_image(batch_size):
    """Faces and mirror images share forward calls; each face must still get its own mirror's answer."""
    torch.manual_seed(0)
    model = network.build_model("EmotionNet", {"widths": [8, 8, 8, 8]}, 7).eval()
    faces = np.random.default_rng(2).integers(0, 256, (11, 48, 48), dtype=np.uint8)
    x = network.subpixel_shift(network.to_input(faces))  # the test-time resampling first, the mirror image of that
    with torch.no_grad():
        expected = (model(x).softmax(1) + model(torch.flip(x, dims=[3])).softmax(1)) / 2
    got = network.predict_proba(model, faces, torch.device("cpu"), bf16=False, batch_size=batch_size)
    assert torch.allclose(got, expected, atol=1e-5)


def test_fused_model_computes_the_same_function():
    torch.manual_seed(0)
    model = network.build_model("EmotionNet", {"widths": [8, 16, 16, 32], "blocks": [1, 2, 1, 1]}, 7)
    with torch.no_grad():
        for m in model.modules():  # BatchNorm statistics far from the identity, as after training
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.2, 3), m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    fused = network.fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is left as it was
    x = torch.randn(4, 1, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model(x), fused(x), atol=1e-4)
    faces = np.random.default_rng(0).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    p = network.predict_proba(fused, faces, torch.device("cpu"), bf16=False)
    assert torch.allclose(p, network.predict_proba(model, faces, torch.device("cpu"), bf16=False), atol=1e-4)


def test_checkpoint_round_trip(tmp_path):
    model, ckpt = tiny_checkpoint()
    path = tmp_path / "m.pt"
    checkpoints.atomic_save(ckpt, path)
    torch.load(path, weights_only=True)  # plain types only
    loaded = checkpoints.load_checkpoint(path)
    again = network.model_from_checkpoint(loaded, torch.device("cpu"))
    x = torch.randn(2, 1, 48, 48)
    model.eval()
    assert torch.allclose(model(x), again(x), atol=1e-5)
    assert loaded["class_names"] == sorted(EMOTIONS) and loaded["metrics"] == {"accuracy": 0.5}


def test_atomic_save_keeps_backup(tmp_path):
    path = tmp_path / "m.pt"
    checkpoints.atomic_save({"a": 1}, path)
    checkpoints.atomic_save({"a": 2}, path, backup=tmp_path / "m.old.bak.pt")
    assert torch.load(path)["a"] == 2 and torch.load(tmp_path / "m.old.bak.pt")["a"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.old.bak.pt", "m.pt"]  # no temporary file left


def test_interrupted_save_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    checkpoints.atomic_save({"a": 1}, path)

    def broken(obj, f):
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.torch, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_save({"a": 2}, path)
    assert torch.load(path)["a"] == 1 and len(list(tmp_path.iterdir())) == 1


def test_a_failed_json_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "m.metrics.json"
    files.write_json({"a": 1}, path)
    with pytest.raises(TypeError):
        files.write_json({"a": object()}, path)  # json.dumps fails before anything is written
    monkeypatch.setattr(Path, "write_text", lambda self, text: (open(self, "w").write(text[:3]), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        files.write_json({"a": 2}, path)  # fails half-written
    assert [p.name for p in tmp_path.iterdir()] == ["m.metrics.json"] and path.read_text() == '{\n  "a": 1\n}\n'


def test_metrics_from_confusion_match_scikit_learn():
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 7, 300), rng.integers(0, 6, 300)  # class 6 never predicted: precision 0
    y[y == 5] = 4  # class 5 never true: recall 0
    classes = list("abcdefg")
    m = scoring.metrics_from_confusion(scoring.confusion_matrix(y, p, 7), classes)
    pr, rc, f1, support = precision_recall_fscore_support(y, p, labels=range(7), zero_division=0)
    got = [[m["per_class"][c][k] for c in classes] for k in ("precision", "recall", "f1", "support")]
    assert np.allclose(got, [pr, rc, f1, support]) and m["accuracy"] == pytest.approx((y == p).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, labels=range(7), average="macro", zero_division=0))
    assert m["confusion"] == scoring.confusion_matrix(y, p, 7).tolist() and np.sum(m["confusion"]) == 300


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "not found"),
        ("corrupt", "damaged"),
        ("foreign", "not a checkpoint of this project"),
        ("newer", "newer than this code"),
        ("arch", "does not match architecture"),
    ],
)
def test_bad_model_files(tmp_path, case, message):
    path = tmp_path / "m.pt"
    _, ckpt = tiny_checkpoint()
    if case == "corrupt":
        path.write_bytes(b"\x00not a zip" * 10)
    elif case == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "newer":
        torch.save({**ckpt, "format_version": checkpoints.CHECKPOINT_FORMAT + 1}, path)
    elif case == "arch":
        torch.save({**ckpt, "arch_args": {"widths": [16, 16, 16, 16]}}, path)
    with pytest.raises(UserError, match=message):
        network.model_from_checkpoint(checkpoints.load_checkpoint(path), torch.device("cpu"), path)


@pytest.mark.parametrize("name", ["retinaface", "haar"])
def test_detectors_on_blank_and_tiny_images(name):
    detector = detection.load_detector(name)
    for shape in ((200, 300, 3), (1, 1, 3), (5, 400, 3)):
        assert detector.detect(np.zeros(shape, np.uint8)) == []


def test_overlapping_boxes_are_merged_into_one_per_face():
    face, shifted, inner, other = (
        (100, 100, 50, 50, 0.9),
        (105, 102, 50, 50, 0.8),
        (110, 110, 25, 25, 0.95),
        (300, 100, 50, 50, 0.7),
    )
    kept = detection.merge_overlapping([face, shifted, inner, other])
    assert kept == [inner, other]  # the best-scored box of each face; a box inside another is the same face


def test_crop_frames_like_fer2013_and_repeats_edges():
    gray = np.arange(100 * 100, dtype=np.int64).reshape(100, 100).astype(np.uint8)
    square = detection.fer_square((40, 30, 20, 30), detection.RETINAFACE_FRAMING)
    assert square[2] == square[3] == pytest.approx(20 * 1.297)  # wider than the box, square
    assert square[0] + square[2] / 2 == pytest.approx(50 - 0.003 * 20)
    crop = detection.crop_face(gray, (-10, -10, 30, 30), 48, None)  # past the corner: edges repeated
    assert crop.shape == (48, 48) and crop[0, 0] == gray[0, 0]


def test_letterbox_fits_a_photo_into_a_video_frame():
    wide = np.full((100, 200, 3), 200, np.uint8)  # scaled by 3.2: 320 x 640, black below
    frame = detection.letterbox(wide, 640, 480)
    assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
    assert (frame[:320] == 200).all() and (frame[320:] == 0).all()
    tall = detection.letterbox(np.full((960, 100), 7, np.uint8), 640, 480)  # scaled by 0.5: 480 x 50, black right
    assert tall.shape == (480, 640) and (tall[:, :50] == 7).all() and (tall[:, 50:] == 0).all()


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected", [(False, False, False), (True, False, True), (False, True, True)]
)
def test_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, avx512_bf16, amx, expected):
    """oneDNN says yes on any AVX-512 CPU (emulated bfloat16, slower than float32): its answer is not used."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert network.cpu_has_bf16() is expected
    if not expected:  # no autocast at all: float32 throughout
        with network.autocast_for(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")


def test_bf16_off_where_torch_cannot_tell(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert network.cpu_has_bf16() is False


@pytest.mark.parametrize(
    "model, expected",
    [("runs/a/Model.pt", "runs/a/Model.last.pt"), ("Model", "Model.last.pt"), ("m.v2.pt", "m.v2.last.pt")],
)
def test_files_beside_a_model_share_its_stem(model, expected):
    assert files.beside_model(Path(model), ".last.pt") == Path(expected)
    assert onnx_model.int8_path(Path(model)) == Path(expected.replace(".last.pt", ".int8.onnx"))


def test_a_folder_is_listed_as_torchvision_s_imagefolder_lists_it(tmp_path):
    """images.folder_samples lists a tree without torchvision (the light install): the same classes and files, in the
    same order, as ImageFolder, which train.py's data come through in the original design."""
    from torchvision.datasets import ImageFolder  # here: only this check needs torchvision

    for rel in (
        "sad/b.png",
        "sad/a.JPG",
        "sad/sub/z.jpg",
        "sad/sub/notes.txt",
        "happy/2.jpg",
        "happy/10.jpg",
        ".x/a.jpg",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "angry").mkdir()  # an empty class folder is a class
    ours = images.folder_samples(tmp_path)
    theirs = ImageFolder(str(tmp_path), loader=lambda p: p, allow_empty=True, is_valid_file=images.is_image_file)
    assert ours == (theirs.samples, theirs.classes)
    assert [p[len(str(tmp_path)) + 1 :] for p, _ in ours[0]][-3:] == ["sad/a.JPG", "sad/b.png", "sad/sub/z.jpg"]
