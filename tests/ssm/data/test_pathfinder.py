"""Pathfinder generator, tokens and LRA release reader; labels checked by a pixel flood fill."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from ssm.data import pathfinder as pf


def straight_path(row: float, col0: float, num_dashes: int, dash: float,
                  gap: float) -> np.ndarray:
  """A horizontal dashed path along `row`, starting at col0: float [num_dashes, 2, 2]."""
  starts = col0 + np.arange(num_dashes) * (dash + gap)
  return np.stack([np.stack([np.full(num_dashes, row), starts], -1),
                   np.stack([np.full(num_dashes, row), starts + dash], -1)], 1)


def chebyshev_apart(a: np.ndarray, b: np.ndarray, distance: int) -> bool:
  """Whether every pixel of mask a is more than `distance` (Chebyshev) from every one of b."""
  return not (pf.dilate(a, distance) & b).any()


def test_tokens_are_pixels_plus_one():
  image = np.array([[0, 255], [7, 1]], dtype=np.uint8)
  np.testing.assert_array_equal(pf.to_tokens(image), [1, 256, 8, 2])
  np.testing.assert_array_equal(pf.to_tokens(image[None]), [[1, 256, 8, 2]])
  assert pf.to_tokens(image).dtype == np.int32 and pf.VOCAB_SIZE == 257 and pf.PAD_ID == 0
  data = pf.generate(4, size=32, difficulty="easy", seed=0)
  tokens = pf.to_tokens(data["images"])
  assert tokens.shape == (4, 32 * 32) and tokens.min() >= 1 and tokens.max() <= 256
  examples = pf.as_examples(data)
  assert len(examples) == 4 and examples[2]["label"] == int(data["labels"][2])
  assert examples[2]["tokens"].dtype == np.int32
  np.testing.assert_array_equal(examples[2]["tokens"],
                                data["images"][2].reshape(-1).astype(int) + 1)
  for bad in (np.full((2, 2), 0.5), np.full((2, 2), -1), np.full((2, 2), 256),
              np.zeros((2, 3), np.uint8)):
    with pytest.raises(ValueError, match="images"):
      pf.to_tokens(bad)


@pytest.mark.parametrize("difficulty", ["easy", "intermediate", "hard"])
def test_generate_shapes_range_and_balance(difficulty):
  data = pf.generate(40, size=32, difficulty=difficulty, seed=5)
  images, labels, markers = data["images"], data["labels"], data["markers"]
  assert images.shape == (40, 32, 32) and images.dtype == np.uint8
  assert labels.shape == (40,) and labels.dtype == np.int32 and set(labels) == {0, 1}
  assert 0.25 < labels.mean() < 0.75
  assert markers.shape == (40, 2, 2) and markers.min() >= 0 and markers.max() <= 31
  # A marker centre is fully covered; most of the image is background.
  for image, m in zip(images, np.rint(markers).astype(int)):
    assert image[m[0, 0], m[0, 1]] == 255 and image[m[1, 0], m[1, 1]] == 255
    assert 0.5 < (image == 0).mean() < 0.95


def test_generate_is_deterministic_and_seeded():
  a = pf.generate(6, size=32, seed=3)
  b = pf.generate(6, size=32, seed=3)
  c = pf.generate(6, size=32, seed=4)
  prefix = pf.generate(3, size=32, seed=3)
  for key in ("images", "labels", "markers"):
    np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(prefix[key], a[key][:3])
  assert not np.array_equal(a["images"], c["images"])


def test_hand_placed_scene_labels_and_connectivity():
  # Two parallel dashed paths 12 rows apart; dash 2, gap 1, as at the 32x32 defaults.
  paths = (straight_path(8, 4, 8, 2, 1), straight_path(20, 4, 8, 2, 1))
  cases = {((0, 0), (0, 1)): 1, ((1, 1), (1, 0)): 1, ((0, 1), (1, 0)): 0,
           ((1, 0), (0, 0)): 0, ((0, 1), (0, 1)): 0}
  for marker_ends, label in cases.items():
    scene = pf.Scene(paths=paths, marker_ends=marker_ends)
    assert scene.label == label
    np.testing.assert_array_equal(
        scene.markers, [pf.path_end(paths[p], e) for p, e in marker_ends])
    image = pf.render(scene, size=32, line_width=1.0, marker_radius=1.5)
    for r, c in np.rint(scene.markers).astype(int):
      assert image[r, c] == 255
    if marker_ends[0] != marker_ends[1]:
      assert pf.markers_connected(image, scene.markers, gap=1) == bool(label)
  np.testing.assert_array_equal(pf.path_end(paths[0], 0), [8, 4])
  np.testing.assert_array_equal(pf.path_end(paths[0], 1), [8, 4 + 8 * 3 - 1])

  # A distractor bridging the two paths joins them in the pixels (the check reads pixels, not
  # labels): a vertical dashed path from row 9.5 to row 18.5 at col 12.
  bridge = np.array([[[9.5, 12], [11.5, 12]], [[12.5, 12], [14.5, 12]],
                     [[15.5, 12], [17.5, 12]], [[18.5, 12], [19, 12]]])
  scene = pf.Scene(paths=paths + (bridge,), marker_ends=((0, 0), (1, 0)))
  image = pf.render(scene, size=32, line_width=1.0, marker_radius=1.5)
  assert scene.label == 0 and pf.markers_connected(image, scene.markers, gap=1)


def test_flood_fill_bridges_exactly_the_gap():
  # Dashes on an integer row paint only that row; a continuous gap of 4 leaves 3 empty pixels,
  # so painted pixels across it are 4 apart (Chebyshev).
  path = straight_path(10, 4, 4, 2, 4)
  scene = pf.Scene(paths=(path,), marker_ends=((0, 0), (0, 1)))
  image = pf.render(scene, size=32, line_width=1.0, marker_radius=0.5)
  assert np.array_equal(np.nonzero(image[10])[0], [4, 5, 6, 10, 11, 12, 16, 17, 18, 22, 23, 24])
  assert (image[:10] == 0).all() and (image[11:] == 0).all()
  assert pf.markers_connected(image, scene.markers, gap=4)
  assert not pf.markers_connected(image, scene.markers, gap=3)
  # A marker off the ink is never connected.
  assert not pf.markers_connected(image, np.array([[0.0, 0.0], [10.0, 4.0]]), gap=4)


@pytest.mark.parametrize("size,difficulty", [(32, "easy"), (32, "intermediate"), (32, "hard"),
                                             (128, "hard")])
def test_scenes_follow_the_recipe(size, difficulty):
  s = pf.resolve_settings(size=size, difficulty=difficulty)
  assert s.path_length == pf.DIFFICULTIES[difficulty]
  num = 20 if size == 32 else 4
  data = pf.generate(num, size=size, difficulty=difficulty, seed=11)
  distractors = []
  for i in range(num):
    scene = pf.sample_scene(pf.example_rng(11, i), s)
    # generate() renders exactly this scene.
    image = pf.render(scene, size=size, line_width=s.line_width, marker_radius=s.marker_radius)
    np.testing.assert_array_equal(image, data["images"][i])
    assert data["labels"][i] == scene.label
    np.testing.assert_allclose(data["markers"][i], scene.markers, atol=1e-4)
    assert 2 <= len(scene.paths) <= 2 + s.num_distractors
    distractors.append(len(scene.paths) - 2)
    # Markers sit on ends of the targets: both ends of one (label 1) or one on each (label 0).
    (p, e), (q, f) = scene.marker_ends
    assert {p, q} <= {0, 1} and (p == q) == (scene.label == 1) and (p != q or e != f)
    for path in scene.paths:
      assert path.shape == (s.path_length, 2, 2)
      steps = path[:, 1] - path[:, 0]
      np.testing.assert_allclose(np.hypot(*steps.T), s.dash_length)
      np.testing.assert_allclose(np.hypot(*(path[1:, 0] - path[:-1, 1]).T), s.gap)
      turns = np.diff(np.arctan2(steps[:, 1], steps[:, 0]))
      turns = (turns + math.pi) % (2 * math.pi) - math.pi
      assert np.abs(turns).max(initial=0) <= math.radians(s.max_turn_deg) + 1e-9
    # Different paths (with the target end discs) keep more than the link distance apart.
    inks = []
    for j, path in enumerate(scene.paths):
      canvas = pf.draw_path(np.zeros((size, size)), path, line_width=s.line_width)
      if j < 2:
        for end in (0, 1):
          pf.draw_marker(canvas, pf.path_end(path, end), radius=s.marker_radius)
      inks.append(canvas > 0)
    for j in range(len(inks)):
      for k in range(j):
        assert chebyshev_apart(inks[j], inks[k], s.link), (i, j, k)
  # Distractors are best effort; most of them fit at the defaults.
  assert np.mean(distractors) >= 0.6 * s.num_distractors


@pytest.mark.parametrize("size,difficulty,num", [(32, "easy", 50), (32, "intermediate", 50),
                                                 (32, "hard", 50), (128, "hard", 6)])
def test_flood_fill_agrees_with_generated_labels(size, difficulty, num):
  s = pf.resolve_settings(size=size, difficulty=difficulty)
  data = pf.generate(num, size=size, difficulty=difficulty, seed=21)
  connected = [pf.markers_connected(image, m, gap=s.gap)
               for image, m in zip(data["images"], data["markers"])]
  # The generator keeps paths apart, so the pixels decide every label.
  np.testing.assert_array_equal(np.array(connected, dtype=np.int32), data["labels"])


@pytest.mark.parametrize("kwargs,field", [
    (dict(size=4), "size"), (dict(size=32.0), "size"), (dict(difficulty="medium"), "difficulty"),
    (dict(path_length=0), "path_length"), (dict(path_length=2.5), "path_length"),
    (dict(path_length=1000), "path_length"),
    (dict(num_distractors=-1), "num_distractors"),
    (dict(num_distractors=True), "num_distractors"), (dict(dash_length=0), "dash_length"),
    (dict(dash_length=30), "dash_length"), (dict(gap=-1), "gap"),
    (dict(line_width=0.5), "line_width"), (dict(marker_radius=0.2), "marker_radius"),
    (dict(max_turn_deg=200), "max_turn_deg"), (dict(max_turn_deg="30"), "max_turn_deg"),
    (dict(seed=-1), "seed"), (dict(num_examples=-1), "num_examples"),
])
def test_bad_settings_name_the_field(kwargs, field):
  kwargs = dict(kwargs)
  num = kwargs.pop("num_examples", 1)
  with pytest.raises(ValueError, match=field):
    pf.generate(num, **kwargs)


def write_png(path, image):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)


def test_read_release(tmp_path):
  data = pf.generate(3, size=32, difficulty="hard", seed=1)
  base = tmp_path / "pathfinder32" / "curv_contour_length_14"
  write_png(base / "imgs/0/sample_0.png", data["images"][0])
  write_png(base / "imgs/0/sample_1.png", data["images"][1])
  write_png(base / "imgs/1/sample_0.png", data["images"][2])
  (base / "imgs/1/sample_1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  (base / "imgs/1/sample_2.png").write_bytes(b"")  # the release has an empty PNG too
  write_png(base / "imgs/1/sample_3.png", np.zeros((16, 16), np.uint8))  # wrong size
  meta = base / "metadata"
  meta.mkdir()
  # Text despite the .npy name: folder, file, (unused), label, (unused). Files are read in
  # numeric order: 2.npy before 10.npy.
  (meta / "10.npy").write_text("imgs/1/ sample_0.png 0 1 14\n\nimgs/1 sample_2.png 0 1 14\n"
                               "imgs/1 sample_3.png 0 0 14\n")
  (meta / "2.npy").write_text("imgs/0 sample_1.png 1 0 14\nimgs/1 sample_1.png 0 1 14\n")
  np.save(meta / "0.npy", np.array([["imgs/0", "sample_0.png", "0", "1", "14"]]))

  entries = pf.release_entries(tmp_path, 32, "hard")
  assert [(p.relative_to(base).as_posix(), y) for p, y in entries] == [
      ("imgs/0/sample_0.png", 1), ("imgs/0/sample_1.png", 0), ("imgs/1/sample_1.png", 1),
      ("imgs/1/sample_0.png", 1), ("imgs/1/sample_2.png", 1), ("imgs/1/sample_3.png", 0)]
  out, skipped = pf.read_release(tmp_path, 32, "hard")
  assert skipped == 3
  assert out["images"].dtype == np.uint8 and out["labels"].dtype == np.int32
  np.testing.assert_array_equal(out["images"], data["images"][[0, 1, 2]])
  np.testing.assert_array_equal(out["labels"], [1, 0, 1])
  # The folder name works in place of the difficulty.
  same, _ = pf.read_release(tmp_path, 32, "curv_contour_length_14")
  np.testing.assert_array_equal(same["images"], out["images"])
  # An RGB image is read as grayscale.
  rgb = np.repeat(data["images"][0][..., None], 3, axis=-1)
  write_png(tmp_path / "rgb.png", rgb)
  np.testing.assert_array_equal(pf.load_image(tmp_path / "rgb.png", 32), data["images"][0])

  with pytest.raises(ValueError, match="difficulty"):
    pf.read_release(tmp_path, 32, "medium")
  with pytest.raises(ValueError, match="size"):
    pf.read_release(tmp_path, 0, "hard")
  with pytest.raises(FileNotFoundError, match="pathfinder64"):
    pf.read_release(tmp_path, 64, "hard")
  (meta / "11.npy").write_text("imgs/0 sample_0.png 0\n")
  with pytest.raises(ValueError, match=r"11\.npy:1"):
    pf.read_release(tmp_path, 32, "hard")
