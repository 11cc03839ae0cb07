"""Pathfinder / Path-X: are the two markers on the same curve? (Linsley et al. 2018, used by LRA.)

A grayscale image (32x32 for Pathfinder, 128x128 for Path-X) shows several curved paths drawn as
dashes separated by gaps. Two of them are target paths; two markers (filled discs) sit on target
path ends. Label 1: both markers sit on the two ends of the same target path; label 0: one
marker on each target path. The other paths are distractors. Difficulty is the number of dashes
per path: easy 6, intermediate 9, hard 14 (the LRA folders curv_baseline, curv_contour_length_9,
curv_contour_length_14).

Geometry (coordinates are (row, col) in pixels, pixel (r, c) has its centre at (r, c)):
- A path is a random walk of `path_length` dashes. Dash k runs from s_k to e_k = s_k + L u_k,
  with L = dash_length, u_k = (cos t_k, sin t_k); the next starts a gap further on,
  s_{k+1} = e_k + gap u_{k+1}, and its direction turns by t_{k+1} - t_k ~ U[-max_turn, max_turn]
  (degrees). Every path, distractors included, has the same length, so length is no cue.
- A stroke of width w paints each pixel with max(its value, clip(w/2 + 1/2 - d, 0, 1)), d the
  distance from the pixel centre to the dash (a box-filter approximation of anti-aliasing); a
  marker of radius R paints clip(R + 1/2 - d, 0, 1) with d the distance to its centre. Values
  are scaled to 0..255 and rounded; the background is 0.
- Paths keep apart: every pixel a new path paints is more than `link = max(gap, 1)` pixels
  (Chebyshev distance) from every pixel of the paths and target-end discs already drawn, while
  consecutive dashes of one path are at most `link` apart (the pixels nearest to e_k and to
  s_{k+1} are both painted). So "two painted pixels within Chebyshev distance link are
  connected" recovers exactly the paths from the pixels, which `markers_connected` uses to check
  labels independently of the generator. Paths may cross themselves (harmless for the label).
- Both target paths are drawn first, each with room for a marker disc at both ends (whichever
  ends get the markers); then up to `num_distractors` distractor paths, each given a fixed number
  of placement tries: in a crowded image fewer distractors are drawn (never fewer targets).

Defaults scale with the image: dash_length = gap = max(1, round(size / 32)),
line_width = max(1, size / 64), marker_radius = 1.5 size / 32, max_turn 30 degrees, and
num_distractors = max(1, round(28 / path_length)) (easy 5, intermediate 3, hard 2), which keeps
the total ink about the same across difficulties.

Randomness: example i is drawn from numpy's PCG64 seeded with (seed, i), so the first k examples
do not depend on how many are asked for, and any example can be regenerated on its own.

Tokens (`to_tokens`): the image read row by row, token = pixel value + 1, so ids are 1..256 and
0 stays free for padding (VOCAB_SIZE = 257).

LRA release reader (`read_release`): `<root>/pathfinder<size>/<folder>/metadata/*.npy` where
<folder> is one of RELEASE_DIRS. Despite the extension the metadata files are plain text, one
image per line, space-separated: column 0 the image folder relative to <folder> (e.g. "imgs/0"),
column 1 the file name ("sample_0.png"), column 3 the label (1 = connected); the other columns
are not used. Images are grayscale PNGs, read with Pillow.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PAD_ID = 0
PIXEL_OFFSET = 1  # token id of pixel value v is v + PIXEL_OFFSET
VOCAB_SIZE = 256 + PIXEL_OFFSET
NUM_CLASSES = 2

DIFFICULTIES = {"easy": 6, "intermediate": 9, "hard": 14}  # dashes per path
RELEASE_DIRS = {"easy": "curv_baseline", "intermediate": "curv_contour_length_9",
                "hard": "curv_contour_length_14"}
DEFAULT_MAX_TURN_DEG = 30.0
MAX_PATH_LENGTH = 256

# Placement effort: directions drawn per dash before backtracking, direction draws per dash of
# a path (budget of one walk), walks per path, whole-image restarts.
_DASH_TRIES = 4
_WALK_BUDGET = 12
_PATH_STARTS = 20
_IMAGE_ATTEMPTS = 50


@dataclasses.dataclass(frozen=True)
class Settings:
  """Resolved generator settings (see the module docstring for their meaning)."""
  size: int
  path_length: int
  num_distractors: int
  dash_length: int
  gap: int
  line_width: float
  marker_radius: float
  max_turn_deg: float

  @property
  def link(self) -> int:
    """Chebyshev distance up to which painted pixels belong to one path."""
    return max(self.gap, 1)

  @property
  def line_margin(self) -> float:
    """How far every dash end stays from the image border (its stroke stays inside)."""
    return self.line_width / 2 + 0.5

  @property
  def end_margin(self) -> float:
    """How far target path ends stay from the border (their marker disc stays inside)."""
    return max(self.marker_radius, self.line_width / 2) + 0.5


@dataclasses.dataclass(frozen=True)
class Scene:
  """Paths and marker placement of one image, before rendering.

  paths: float arrays [path_length, 2, 2]; paths[p][k] = (s_k, e_k), the (row, col) ends of
    dash k. Paths 0 and 1 are the targets, the rest distractors.
  marker_ends: two (path index, end) pairs, end 0 = s_0 (first dash start), 1 = e_last.
  """
  paths: tuple[np.ndarray, ...]
  marker_ends: tuple[tuple[int, int], tuple[int, int]]

  @property
  def markers(self) -> np.ndarray:
    """Marker centres, float [2, 2] (row, col)."""
    return np.stack([path_end(self.paths[p], e) for p, e in self.marker_ends])

  @property
  def label(self) -> int:
    return marker_label(self.marker_ends)


def path_end(path: np.ndarray, end: int) -> np.ndarray:
  """(row, col) of a path's end: 0 -> start of the first dash, 1 -> end of the last dash."""
  return np.asarray(path[0, 0] if end == 0 else path[-1, 1], dtype=np.float64)


def marker_label(marker_ends: Sequence[tuple[int, int]]) -> int:
  """1 if the two markers sit on the two ends of one path, else 0."""
  (p, e), (q, f) = marker_ends
  return int(p == q and e != f)


def _is_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _is_real(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def validate_settings(size: int, path_length: int, num_distractors: int, dash_length: int,
                      gap: int, line_width: float, marker_radius: float,
                      max_turn_deg: float) -> None:
  """Raises ValueError naming the argument when a setting is out of range."""
  for name, value, low in (("size", size, 8), ("path_length", path_length, 1),
                           ("num_distractors", num_distractors, 0),
                           ("dash_length", dash_length, 1), ("gap", gap, 0)):
    if not _is_int(value) or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  if path_length > MAX_PATH_LENGTH:  # the walk recurses once per dash
    raise ValueError(f"path_length must be at most {MAX_PATH_LENGTH}, got {path_length}")
  if not _is_real(line_width) or not 1.0 <= line_width <= size / 4:
    raise ValueError(f"line_width must be a number in [1, size / 4 = {size / 4:g}], "
                     f"got {line_width!r}")
  if not _is_real(marker_radius) or not line_width / 2 <= marker_radius <= size / 4:
    raise ValueError(f"marker_radius must be a number in [line_width / 2 = {line_width / 2:g}, "
                     f"size / 4 = {size / 4:g}], got {marker_radius!r}")
  if not _is_real(max_turn_deg) or not 0.0 <= max_turn_deg <= 180.0:
    raise ValueError(f"max_turn_deg must be a number of degrees in [0, 180], "
                     f"got {max_turn_deg!r}")
  span = size - 1 - 2 * (max(marker_radius, line_width / 2) + 0.5)
  if dash_length >= span:
    raise ValueError(f"dash_length={dash_length} does not fit in a {size}x{size} image: dash "
                     f"ends must lie in a {span:g}-pixel wide square away from the border")


def resolve_settings(*, size: int = 32, difficulty: str = "hard", path_length: int | None = None,
                     num_distractors: int | None = None, dash_length: int | None = None,
                     gap: int | None = None, line_width: float | None = None,
                     marker_radius: float | None = None,
                     max_turn_deg: float = DEFAULT_MAX_TURN_DEG) -> Settings:
  """Fills in the size-dependent defaults, validates, and returns the Settings.

  path_length, when given, overrides difficulty's; None settings take the defaults of the
  module docstring.
  """
  if not _is_int(size) or size < 8:
    raise ValueError(f"size must be an integer >= 8, got {size!r}")
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
  if path_length is None:
    path_length = DIFFICULTIES[difficulty]
  if num_distractors is None and _is_int(path_length) and path_length >= 1:
    num_distractors = max(1, round(28 / path_length))
  s = Settings(
      size=size, path_length=path_length, num_distractors=num_distractors,
      dash_length=max(1, round(size / 32)) if dash_length is None else dash_length,
      gap=max(1, round(size / 32)) if gap is None else gap,
      line_width=max(1.0, size / 64) if line_width is None else line_width,
      marker_radius=1.5 * size / 32 if marker_radius is None else marker_radius,
      max_turn_deg=max_turn_deg)
  validate_settings(**dataclasses.asdict(s))
  return s


# ----------------------------------------------------------------------------------------------
# Rasterisation.


def _stroke_patch(p0: Sequence[float], p1: Sequence[float], radius: float,
                  size: int) -> tuple[tuple[slice, slice], np.ndarray]:
  """Coverage clip(radius + 1/2 - d, 0, 1) of the segment p0-p1 (a disc when p0 == p1).

  Returns the window (row slice, col slice) of the image that holds every covered pixel, and
  the coverage float [rows, cols] on it (zeros where uncovered).
  """
  window, dist = _segment_distance(p0, p1, radius + 0.5, size)
  cover = radius + 0.5 - dist
  np.clip(cover, 0.0, 1.0, out=cover)
  return window, cover


def _segment_distance(p0: Sequence[float], p1: Sequence[float], reach: float,
                      size: int) -> tuple[tuple[slice, slice], np.ndarray]:
  """Distance from the pixel centres of the window around segment p0-p1 (grown by reach) to
  the segment: the window and float [rows, cols]."""
  r0, c0 = float(p0[0]), float(p0[1])
  dr, dc = float(p1[0]) - r0, float(p1[1]) - c0
  rlo = max(math.floor(min(r0, r0 + dr) - reach), 0)
  rhi = min(math.ceil(max(r0, r0 + dr) + reach), size - 1)
  clo = max(math.floor(min(c0, c0 + dc) - reach), 0)
  chi = min(math.ceil(max(c0, c0 + dc) + reach), size - 1)
  rows = (np.arange(rlo, rhi + 1) - r0)[:, None]  # offsets from p0
  cols = (np.arange(clo, chi + 1) - c0)[None, :]
  length2 = dr * dr + dc * dc
  if length2 > 0:
    t = (rows * dr + cols * dc) * (1.0 / length2)
    np.clip(t, 0.0, 1.0, out=t)
    dist = np.hypot(rows - t * dr, cols - t * dc)
  else:
    dist = np.hypot(rows, cols)
  return (slice(rlo, rhi + 1), slice(clo, chi + 1)), dist


def draw_path(canvas: np.ndarray, path: np.ndarray, *, line_width: float = 1.0) -> np.ndarray:
  """Paints the dashes of `path` (float [num_dashes, 2, 2]) into `canvas` (float [S, S], values
  in [0, 1], max-blended) in place, and returns it."""
  for p0, p1 in np.asarray(path, dtype=np.float64):
    window, cover = _stroke_patch(p0, p1, line_width / 2, canvas.shape[0])
    np.maximum(canvas[window], cover, out=canvas[window])
  return canvas


def draw_marker(canvas: np.ndarray, center: np.ndarray, *, radius: float) -> np.ndarray:
  """Paints a filled disc of `radius` at `center` (row, col) into `canvas` in place."""
  c = np.asarray(center, dtype=np.float64)
  window, cover = _stroke_patch(c, c, radius, canvas.shape[0])
  np.maximum(canvas[window], cover, out=canvas[window])
  return canvas


def render(scene: Scene, *, size: int, line_width: float, marker_radius: float) -> np.ndarray:
  """The image of a scene: every path and both markers, uint8 [size, size]."""
  canvas = np.zeros((size, size), dtype=np.float64)
  for path in scene.paths:
    draw_path(canvas, path, line_width=line_width)
  for center in scene.markers:
    draw_marker(canvas, center, radius=marker_radius)
  return np.rint(canvas * 255).astype(np.uint8)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  """Binary dilation of a bool [H, W] mask by a (2 radius + 1)^2 square (Chebyshev ball)."""
  out = mask.copy()
  for axis in (0, 1):
    grown = out.copy()
    n = out.shape[axis]
    for k in range(1, min(radius, n - 1) + 1):
      lead = [slice(None)] * 2
      lag = [slice(None)] * 2
      lead[axis], lag[axis] = slice(k, None), slice(None, n - k)
      grown[tuple(lead)] |= out[tuple(lag)]
      grown[tuple(lag)] |= out[tuple(lead)]
    out = grown
  return out


def markers_connected(image: np.ndarray, markers: np.ndarray, *, gap: int,
                      threshold: int = 0) -> bool:
  """Whether the two markers lie on one connected curve, judged from the pixels alone.

  Pixels brighter than `threshold` are ink; two ink pixels are linked when their Chebyshev
  distance is at most max(gap, 1), which bridges the gaps between the dashes of a path but not
  the space the generator keeps between different paths. Flood-fills from the pixel nearest
  markers[0] and reports whether the pixel nearest markers[1] is reached.

  image: uint8 [S, S]; markers: [2, 2] (row, col) marker centres.
  """
  ink = np.asarray(image) > threshold
  (r0, c0), (r1, c1) = np.rint(np.asarray(markers, dtype=np.float64)).astype(int)
  if not (ink[r0, c0] and ink[r1, c1]):
    return False
  link = max(int(gap), 1)
  reached = np.zeros_like(ink)
  reached[r0, c0] = True
  while True:
    grown = dilate(reached, link) & ink
    if grown[r1, c1]:
      return True
    if np.array_equal(grown, reached):
      return False
    reached = grown


# ----------------------------------------------------------------------------------------------
# Sampling.


def random_path(rng: np.random.Generator, s: Settings, forbidden: np.ndarray | None = None,
                *, with_ends: bool = False) -> np.ndarray | None:
  """One random walk of s.path_length dashes; float [path_length, 2, 2], or None.

  Every painted pixel avoids `forbidden` (bool [S, S]); dash ends stay s.line_margin from the
  border, and with_ends the two path ends stay s.end_margin from it. The walk backtracks: when
  none of a few drawn directions works for dash k, it redraws dash k - 1, and so on, until a
  budget of direction draws is spent (then None).
  """
  size, gap, length = s.size, s.gap, s.dash_length
  lo, hi = s.line_margin, size - 1 - s.line_margin
  end_lo, end_hi = (s.end_margin, size - 1 - s.end_margin) if with_ends else (lo, hi)
  reach = s.line_width / 2 + 0.5
  max_turn = math.radians(s.max_turn_deg)
  last = s.path_length - 1
  start = rng.uniform(end_lo, end_hi, size=2)
  draws = rng.random(size=_WALK_BUDGET * s.path_length)  # one per direction draw
  dashes = np.empty((s.path_length, 2, 2))
  used = 0

  def admissible(r0: float, c0: float, r1: float, c1: float, k: int) -> bool:
    a, b = (end_lo, end_hi) if k == last else (lo, hi)
    if not (lo <= r0 <= hi and lo <= c0 <= hi and a <= r1 <= b and a <= c1 <= b):
      return False
    if forbidden is None:
      return True
    window, dist = _segment_distance((r0, c0), (r1, c1), reach, size)
    blocked = forbidden[window]
    return not (blocked.any() and (dist[blocked] < reach).any())

  def extend(k: int, theta: float) -> bool:
    nonlocal used
    if k == s.path_length:
      return True
    for _ in range(_DASH_TRIES):
      if used == len(draws):
        return False
      x = draws[used]
      used += 1
      t = 2 * math.pi * x if k == 0 else theta + (2 * x - 1) * max_turn
      ur, uc = math.cos(t), math.sin(t)
      if k == 0:
        r0, c0 = float(start[0]), float(start[1])
      else:
        r0, c0 = dashes[k - 1, 1, 0] + gap * ur, dashes[k - 1, 1, 1] + gap * uc
      r1, c1 = r0 + length * ur, c0 + length * uc
      if not admissible(r0, c0, r1, c1, k):
        continue
      dashes[k] = (r0, c0), (r1, c1)
      if extend(k + 1, t):
        return True
    return False

  return dashes if extend(0, 0.0) else None


def _ink(s: Settings, path: np.ndarray, with_ends: bool) -> np.ndarray:
  """Pixels a path paints (and, with_ends, the marker discs at both its ends): bool [S, S]."""
  canvas = draw_path(np.zeros((s.size, s.size)), path, line_width=s.line_width)
  if with_ends:
    for end in (0, 1):
      draw_marker(canvas, path_end(path, end), radius=s.marker_radius)
  return canvas > 0


def _place(rng: np.random.Generator, s: Settings, occupied: np.ndarray,
           with_ends: bool) -> np.ndarray | None:
  """A path that keeps more than s.link pixels from `occupied`, or None after a few starts.

  On success its pixels (and end discs, with_ends) are added to `occupied`."""
  forbidden = dilate(occupied, s.link)
  for _ in range(_PATH_STARTS):
    path = random_path(rng, s, forbidden, with_ends=with_ends)
    if path is None:
      continue
    ink = _ink(s, path, with_ends)
    if with_ends and (ink & forbidden).any():  # an end disc comes too close to another path
      continue
    occupied |= ink
    return path
  return None


def sample_scene(rng: np.random.Generator, s: Settings) -> Scene:
  """Two target paths, up to s.num_distractors distractors, and a balanced random label."""
  for _ in range(_IMAGE_ATTEMPTS):
    occupied = np.zeros((s.size, s.size), dtype=bool)
    targets = []
    for _ in range(2):
      path = _place(rng, s, occupied, with_ends=True)
      if path is None:
        break
      targets.append(path)
    if len(targets) < 2:
      continue
    distractors = []
    for _ in range(s.num_distractors):
      path = _place(rng, s, occupied, with_ends=False)
      if path is not None:
        distractors.append(path)
    label, first, end_a, end_b = (int(v) for v in rng.integers(2, size=4))
    if label:
      marker_ends = ((first, end_a), (first, 1 - end_a))
    else:
      marker_ends = ((first, end_a), (1 - first, end_b))
    return Scene(paths=tuple(targets + distractors), marker_ends=marker_ends)
  raise RuntimeError(f"could not place two target paths in {_IMAGE_ATTEMPTS} attempts with "
                     f"{s}; use a larger size or shorter path_length / dash_length")


def example_rng(seed: int, index: int) -> np.random.Generator:
  """The random stream of example `index`."""
  return np.random.default_rng((int(seed), int(index)))


def generate(num_examples: int, *, size: int = 32, difficulty: str = "hard",
             path_length: int | None = None, num_distractors: int | None = None,
             dash_length: int | None = None, gap: int | None = None,
             line_width: float | None = None, marker_radius: float | None = None,
             max_turn_deg: float = DEFAULT_MAX_TURN_DEG, seed: int = 0) -> dict[str, np.ndarray]:
  """`num_examples` Pathfinder images.

  Args:
    size: image side (32 Pathfinder, 128 Path-X).
    difficulty: "easy" | "intermediate" | "hard" (6 / 9 / 14 dashes per path).
    path_length: dashes per path; overrides difficulty.
    num_distractors, dash_length, gap, line_width, marker_radius, max_turn_deg: see the module
      docstring (None -> the size-dependent default).
    seed: example i is drawn from `example_rng(seed, i)`.

  Returns {"images": uint8 [n, size, size], "labels": int32 [n] (1 = the markers are connected),
  "markers": float32 [n, 2, 2] (row, col) marker centres}.
  """
  if not _is_int(num_examples) or num_examples < 0:
    raise ValueError(f"num_examples must be a non-negative integer, got {num_examples!r}")
  if not _is_int(seed) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  s = resolve_settings(size=size, difficulty=difficulty, path_length=path_length,
                       num_distractors=num_distractors, dash_length=dash_length, gap=gap,
                       line_width=line_width, marker_radius=marker_radius,
                       max_turn_deg=max_turn_deg)
  images = np.zeros((num_examples, size, size), dtype=np.uint8)
  labels = np.zeros((num_examples,), dtype=np.int32)
  markers = np.zeros((num_examples, 2, 2), dtype=np.float32)
  for i in range(num_examples):
    scene = sample_scene(example_rng(seed, i), s)
    images[i] = render(scene, size=size, line_width=s.line_width,
                       marker_radius=s.marker_radius)
    labels[i] = scene.label
    markers[i] = scene.markers
  return {"images": images, "labels": labels, "markers": markers}


def to_tokens(images: np.ndarray) -> np.ndarray:
  """Pixel sequences, row-major: int32 [n, S * S] (or [S * S] for one image [S, S]), token =
  pixel value + 1 in 1..256; 0 is left for padding."""
  images = np.asarray(images)
  if images.ndim not in (2, 3) or images.shape[-1] != images.shape[-2]:
    raise ValueError(f"images must be [S, S] or [n, S, S], got shape {images.shape}")
  if images.dtype != np.uint8:
    if images.size and (images.min() < 0 or images.max() > 255
                        or not np.array_equal(images, np.round(images))):
      raise ValueError("images must hold integer pixel values in 0..255")
  flat = images.reshape(images.shape[:-2] + (-1,))
  return flat.astype(np.int32) + PIXEL_OFFSET


def as_examples(data: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
  """{"images", "labels"} -> the pipeline's examples [{"tokens": int32 [S * S], "label": int}]."""
  tokens = to_tokens(data["images"])
  return [{"tokens": t, "label": int(y)} for t, y in zip(tokens, data["labels"])]


# ----------------------------------------------------------------------------------------------
# The LRA release.


def release_dir(root: str | pathlib.Path, size: int, difficulty: str) -> pathlib.Path:
  """`<root>/pathfinder<size>/<RELEASE_DIRS[difficulty]>`; a folder name is accepted too."""
  if not _is_int(size) or size < 1:
    raise ValueError(f"size must be a positive integer, got {size!r}")
  folder = RELEASE_DIRS.get(difficulty, difficulty)
  if folder not in RELEASE_DIRS.values():
    raise ValueError(f"difficulty must be one of {sorted(RELEASE_DIRS)} (or a folder name "
                     f"{sorted(RELEASE_DIRS.values())}), got {difficulty!r}")
  return pathlib.Path(root) / f"pathfinder{size}" / folder


def _metadata_rows(path: pathlib.Path) -> list[list[str]]:
  raw = path.read_bytes()
  if raw.startswith(b"\x93NUMPY"):  # a real .npy (a re-saved copy): a 2-D array of strings
    with open(path, "rb") as f:
      table = np.load(f, allow_pickle=False)
    return [[str(v) for v in row] for row in np.atleast_2d(table)]
  return [line.split() for line in raw.decode("utf-8").splitlines()]


def release_entries(root: str | pathlib.Path, size: int,
                    difficulty: str) -> list[tuple[pathlib.Path, int]]:
  """(image path, label) of every metadata row, metadata files in numeric order (0.npy, 1.npy,
  ...; other names after, by name), rows in file order. Blank lines are skipped; a row with
  fewer than 4 columns or a non-0/1 label raises ValueError naming the file and line."""
  base = release_dir(root, size, difficulty)
  meta = base / "metadata"
  if not meta.is_dir():
    raise FileNotFoundError(f"no metadata folder {meta}")
  files = sorted(meta.glob("*.npy"),
                 key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.name))
  if not files:
    raise FileNotFoundError(f"no metadata files {meta}/*.npy")
  entries = []
  for file in files:
    for line, cols in enumerate(_metadata_rows(file), start=1):
      if not cols:
        continue
      if len(cols) < 4 or cols[3] not in ("0", "1"):
        raise ValueError(f"{file}:{line}: expected '<folder> <file> <any> <label 0|1> ...', "
                         f"got {' '.join(cols)!r}")
      entries.append((base / cols[0] / cols[1], int(cols[3])))
  return entries


def load_image(path: str | pathlib.Path, size: int) -> np.ndarray | None:
  """A grayscale image uint8 [size, size], or None when the file is missing, empty, not a
  decodable image, or of another size. Colour images are converted to grayscale (Pillow's "L")."""
  try:
    from PIL import Image  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading the Pathfinder release needs Pillow (pip install pillow)") from e
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode != "L":
        im = im.convert("L")
      array = np.asarray(im, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError):  # missing / truncated / not an image
    return None
  if array.shape != (size, size):
    return None
  return array


def read_release(root: str | pathlib.Path, size: int,
                 difficulty: str) -> tuple[dict[str, np.ndarray], int]:
  """All images of one release folder, in metadata order.

  Returns ({"images": uint8 [n, size, size], "labels": int32 [n]}, num_skipped), where
  num_skipped counts the metadata rows whose image could not be used (see `load_image`; the
  release has at least one empty PNG); the caller should report it.
  """
  images, labels, skipped = [], [], 0
  for path, label in release_entries(root, size, difficulty):
    image = load_image(path, size)
    if image is None:
      skipped += 1
      continue
    images.append(image)
    labels.append(label)
  data = {"images": (np.stack(images) if images
                     else np.zeros((0, size, size), dtype=np.uint8)),
          "labels": np.asarray(labels, dtype=np.int32)}
  return data, skipped
