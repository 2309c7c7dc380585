"""Datasets that ship inside installed packages, so pnc's default studies run offline (DATA.md).

* ``digits``: scikit-learn's 1,797 handwritten 8x8 digits (values 0..16) scaled to uint8
  ``round(v * 255 / 16)``, seeded stratified train/test split.
* ``digits_domains``: the same ten classes in three rendering styles (domains), generated
  deterministically from material installed with scikit-learn, matplotlib and Pillow:

  - ``handwritten``: scikit-learn's digits, upsampled (bicubic) and re-framed.
  - ``typeset``: the digit printed in one of the TrueType fonts matplotlib ships in
    ``mpl-data/fonts/ttf`` (DejaVu Sans/Serif/Mono in all weights, STIXGeneral, Computer Modern
    cmr10/cmb10/cmti10/cmss10/cmtt10) with seeded jitter of stroke, rotation, aspect, scale
    and offset.
  - ``segment``: electronic-display digits: seven-segment digits (jittered segment thickness,
    gaps, slant, segment shape, glyph variants of 6/7/9) and, for about a third of the
    samples, 5x7 dot-matrix digits (jittered dot size, spacing and slant).

  Every image is white ink on black, framed the same way: the glyph's bounding box is scaled so
  its longer side is ``box`` pixels (~75-85% of ``image_size``) and centred, plus an offset of at
  most one pixel. Classes are balanced (``per_class`` each) and each domain has its own fixed
  stratified train/test split.

Everything is a pure function of the arguments: the same call returns the same bytes on the same
machine (no hash-seed, time or directory-order dependence; fonts are taken from a fixed list).
Rendered pixels may differ across FreeType/Pillow versions, which is why the DVC stage
(:func:`write_embedded`) records digests of what it wrote.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from pnc.data.base import ImageSplit, stratified_split

DIGIT_CLASSES: list[str] = [str(i) for i in range(10)]
DOMAINS: tuple[str, ...] = ("handwritten", "typeset", "segment")
EMBEDDED_DATASETS: tuple[str, ...] = ("digits", "digits_domains")

# Font files (in matplotlib's mpl-data/fonts/ttf) whose '0'..'9' glyphs are ordinary lining digits.
# Fixed order; files missing from an installed matplotlib are skipped (and the used list recorded).
TYPESET_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf",
)

# Seven-segment encodings (segments a=top, b=top right, c=bottom right, d=bottom, e=bottom left,
# f=top left, g=middle); some digits have two common display variants.
_SEVEN_SEGMENT: dict[int, tuple[str, ...]] = {
    0: ("abcdef",), 1: ("bc",), 2: ("abdeg",), 3: ("abcdg",), 4: ("bcfg",), 5: ("acdfg",),
    6: ("acdefg", "cdefg"), 7: ("abc", "abcf"), 8: ("abcdefg",), 9: ("abcdfg", "abcfg"),
}
# 5x7 dot-matrix digits (the classic HD44780 character ROM shapes).
_DOT_MATRIX: dict[int, tuple[str, ...]] = {
    0: (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    1: ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    2: (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    3: ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    4: ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    5: ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    6: ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    7: ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    8: (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    9: (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}

_CANVAS = 96  # supersampled drawing canvas (pixels) for typeset and segment glyphs


# ----------------------------------------------------------------------------- helpers
def _rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and stable string tags (crc32, not ``hash()``)."""
    words = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF]
    words += [zlib.crc32(p.encode()) for p in parts]
    return np.random.default_rng(np.random.SeedSequence(words))


def fraction_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: ``round(n_k * test_fraction)`` of each class go to test; sorted (train, test)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    n_test = np.round(np.bincount(labels) * test_fraction).astype(np.int64)  # half to even, like round()
    test, train = stratified_split(labels, n_test, rng)
    return train, test


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _load

    d = _load()
    images = np.asarray(d.images, dtype=np.float64)
    images.setflags(write=False)
    target = np.asarray(d.target, dtype=np.int64)
    target.setflags(write=False)
    return images, target


def _pil_resize(a: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize a float image with PIL (mode 'F'); ``size`` is (height, width)."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.asarray(im.resize((int(size[1]), int(size[0])), resample=resample), dtype=np.float64)


def _frame(hi: np.ndarray, image_size: int, rng: np.random.Generator, box_share: tuple[float, float]) -> np.ndarray:
    """Crop ``hi`` (float, ink high) to its ink bounding box, scale the longer side to ``box`` =
    ``image_size * uniform(*box_share)`` pixels (antialiased), centre it in an ``image_size`` square shifted
    by (dy, dx), each uniform in {-1, 0, 1}, and return uint8 0..255 with the ink maximum at 255."""
    from PIL import Image

    box = image_size * rng.uniform(*box_share)
    dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
    hi = np.clip(hi, 0.0, None)
    peak = float(hi.max())
    if peak <= 0:
        return np.zeros((image_size, image_size), np.uint8)
    rows = np.flatnonzero((hi > 0.1 * peak).any(axis=1))
    cols = np.flatnonzero((hi > 0.1 * peak).any(axis=0))
    crop = hi[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1] / peak
    h, w = crop.shape
    scale = box / max(h, w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    small = np.clip(_pil_resize(crop, (nh, nw), Image.Resampling.LANCZOS), 0.0, 1.0)
    small = small / max(float(small.max()), 1e-6)
    out = np.zeros((image_size, image_size), np.float64)
    top = min(max((image_size - nh) // 2 + dy, 0), image_size - nh)
    left = min(max((image_size - nw) // 2 + dx, 0), image_size - nw)
    out[top: top + nh, left: left + nw] = small
    return np.round(out * 255.0).astype(np.uint8)


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def typeset_fonts() -> list[Path]:
    """The font files used by the ``typeset`` domain, in their fixed order."""
    d = _font_dir()
    fonts = [d / f for f in TYPESET_FONTS if (d / f).is_file()]
    if not fonts:
        raise RuntimeError(f"no usable TrueType fonts found in {d}")
    return fonts


# ----------------------------------------------------------------------------- domains
def _render_handwritten(labels_wanted: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """scikit-learn digits: pick ``per_class`` of each class (seeded), upsample, frame."""
    from PIL import Image

    images, target = _sklearn_digits()
    out = np.empty((len(labels_wanted), image_size, image_size), np.uint8)
    pools = {k: rng.permutation(np.flatnonzero(target == k)) for k in range(10)}
    used = {k: 0 for k in range(10)}
    for i, k in enumerate(labels_wanted):
        k = int(k)
        if used[k] >= len(pools[k]):
            raise ValueError(f"per_class exceeds the {len(pools[k])} handwritten digits of class {k}")
        src = images[pools[k][used[k]]]
        used[k] += 1
        hi = _pil_resize(src, (64, 64), Image.Resampling.BICUBIC)
        out[i] = _frame(hi, image_size, rng, (0.78, 0.86))
    return out


def _render_typeset(labels_wanted: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Digits printed in matplotlib's fonts with seeded stroke/rotation/aspect/scale/offset jitter."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = typeset_fonts()
    loaded = {p: ImageFont.truetype(str(p), size=56) for p in fonts}
    out = np.empty((len(labels_wanted), image_size, image_size), np.uint8)
    for i, k in enumerate(labels_wanted):
        font = loaded[fonts[int(rng.integers(len(fonts)))]]
        stroke = int(rng.integers(0, 3))
        angle = float(rng.uniform(-10.0, 10.0))
        aspect = float(rng.uniform(0.85, 1.15))
        im = Image.new("L", (_CANVAS, _CANVAS), 0)
        ImageDraw.Draw(im).text((_CANVAS / 2, _CANVAS / 2), str(int(k)), fill=255, font=font,
                                anchor="mm", stroke_width=stroke, stroke_fill=255)
        im = im.rotate(angle, resample=Image.Resampling.BICUBIC)
        im = im.resize((max(1, int(round(_CANVAS * aspect))), _CANVAS), resample=Image.Resampling.BILINEAR)
        out[i] = _frame(np.asarray(im, np.float64), image_size, rng, (0.72, 0.84))
    return out


def _segment_polygon(x0: float, y0: float, x1: float, y1: float, t: float, pointed: bool) -> list[tuple[float, float]]:
    """A segment from (x0, y0) to (x1, y1) (horizontal or vertical) of thickness ``t``:
    a hexagon with pointed ends, or a rectangle."""
    h = t / 2
    if abs(y1 - y0) < 1e-9:  # horizontal
        if pointed:
            return [(x0, y0), (x0 + h, y0 - h), (x1 - h, y0 - h), (x1, y0), (x1 - h, y0 + h), (x0 + h, y0 + h)]
        return [(x0, y0 - h), (x1, y0 - h), (x1, y0 + h), (x0, y0 + h)]
    if pointed:
        return [(x0, y0), (x0 + h, y0 + h), (x0 + h, y1 - h), (x0, y1), (x0 - h, y1 - h), (x0 - h, y0 + h)]
    return [(x0 - h, y0), (x0 + h, y0), (x0 + h, y1), (x0 - h, y1)]


def _draw_seven_segment(k: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw

    segs = _SEVEN_SEGMENT[k][int(rng.integers(len(_SEVEN_SEGMENT[k])))]
    H = 64.0
    W = H * rng.uniform(0.45, 0.62)
    t = H * rng.uniform(0.09, 0.16)
    gap = H * rng.uniform(0.0, 0.035)
    slant = np.tan(np.deg2rad(rng.uniform(0.0, 12.0)))
    pointed = bool(rng.random() < 0.6)
    L, R, T, M, B = 0.0, W, 0.0, H / 2, H
    ends = {  # segment endpoints, shortened by the gap
        "a": (L + gap, T, R - gap, T), "d": (L + gap, B, R - gap, B), "g": (L + gap, M, R - gap, M),
        "f": (L, T + gap, L, M - gap), "b": (R, T + gap, R, M - gap),
        "e": (L, M + gap, L, B - gap), "c": (R, M + gap, R, B - gap),
    }
    cx, cy = _CANVAS / 2 - W / 2, _CANVAS / 2 - H / 2
    im = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(im)
    for s in segs:
        poly = _segment_polygon(*ends[s], t=t, pointed=pointed)
        draw.polygon([(cx + x + slant * (H / 2 - y), cy + y) for x, y in poly], fill=255)
    return np.asarray(im, np.float64)


def _draw_dot_matrix(k: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw

    pitch = rng.uniform(9.0, 11.0)
    radius = pitch * rng.uniform(0.32, 0.5)
    slant = np.tan(np.deg2rad(rng.uniform(0.0, 10.0)))
    square = bool(rng.random() < 0.4)
    cx, cy = _CANVAS / 2 - 2 * pitch, _CANVAS / 2 - 3 * pitch
    im = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(im)
    for r, row in enumerate(_DOT_MATRIX[k]):
        for c, ch in enumerate(row):
            if ch == "#":
                x = cx + c * pitch + slant * (3 - r) * pitch
                y = cy + r * pitch
                bbox = (x - radius, y - radius, x + radius, y + radius)
                (draw.rectangle if square else draw.ellipse)(bbox, fill=255)
    return np.asarray(im, np.float64)


def _render_segment(labels_wanted: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Seven-segment display digits (about two thirds) and 5x7 dot-matrix digits (one third)."""
    from PIL import Image

    out = np.empty((len(labels_wanted), image_size, image_size), np.uint8)
    for i, k in enumerate(labels_wanted):
        dot = bool(rng.random() < 1 / 3)
        hi = _draw_dot_matrix(int(k), rng) if dot else _draw_seven_segment(int(k), rng)
        if dot:  # blur a little so dots read as a glyph once downsampled
            hi = _pil_resize(_pil_resize(hi, (48, 48), Image.Resampling.BOX), (96, 96), Image.Resampling.BILINEAR)
        out[i] = _frame(hi, image_size, rng, (0.76, 0.86))
    return out


_RENDERERS = {"handwritten": _render_handwritten, "typeset": _render_typeset, "segment": _render_segment}


# ----------------------------------------------------------------------------- public API
def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> dict[str, ImageSplit]:
    """scikit-learn's handwritten digits as uint8 N x 8 x 8 x 1 (``round(v * 255 / 16)``),
    classes "0".."9", split stratified and seeded into {"train", "test"}."""
    images, target = _sklearn_digits()
    u8 = np.round(images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    split = fraction_split(target, test_fraction, _rng(seed, "digits", "split"))
    meta = {"dataset": "digits", "seed": int(seed), "test_fraction": float(test_fraction)}
    return _train_test("digits", u8, target, split, "sklearn.datasets.load_digits", meta)


def _train_test(prefix: str, images: np.ndarray, labels: np.ndarray, split: tuple[np.ndarray, np.ndarray],
                source: str, meta: dict) -> dict[str, ImageSplit]:
    """{"train", "test"} of ``images`` and ``labels`` at the (train, test) indices ``split``."""
    return {name: ImageSplit(name=f"{prefix}/{name}", classes=list(DIGIT_CLASSES), labels=labels[idx],
                             images=np.ascontiguousarray(images[idx]), source=source, meta=dict(meta, split=name, index=idx))
            for name, idx in zip(("train", "test"), split)}


def render_domain(domain: str, *, image_size: int = 16, per_class: int = 170, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All ``10 * per_class`` images (uint8 N x S x S x 1) and labels of one domain, class-major."""
    if domain not in _RENDERERS:
        from pnc.errors import did_you_mean

        raise ValueError(f"unknown digits domain {domain!r}.{did_you_mean(domain, DOMAINS)}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    labels = np.repeat(np.arange(10, dtype=np.int64), per_class)
    images = _RENDERERS[domain](labels, int(image_size), _rng(seed, "digits_domains", domain, str(image_size)))
    return images[..., None], labels


def generate_digit_domains(*, image_size: int = 16, per_class: int = 170, test_fraction: float = 0.25,
                           seed: int = 0, domains: Sequence[str] = DOMAINS) -> dict[str, dict[str, ImageSplit]]:
    """{domain: {"train", "test"}} for the ``digits_domains`` dataset (see the module docstring).

    ``per_class`` images of each class per domain (at most 174: the rarest handwritten class);
    each domain has its own seeded stratified split.
    """
    result: dict[str, dict[str, ImageSplit]] = {}
    for domain in domains:
        images, labels = render_domain(domain, image_size=image_size, per_class=per_class, seed=seed)
        split = fraction_split(labels, test_fraction, _rng(seed, "digits_domains", domain, "split"))
        meta = {"dataset": "digits_domains", "domain": domain, "seed": int(seed), "image_size": int(image_size),
                "per_class": int(per_class), "test_fraction": float(test_fraction)}
        if domain == "typeset":
            meta["fonts"] = [p.name for p in typeset_fonts()]
        result[domain] = _train_test(f"digits_domains/{domain}", images, labels, split, f"pnc.data.embedded:{domain}", meta)
    return result


def load_embedded(name: str, *, domain: str | None = None, seed: int = 0) -> dict[str, ImageSplit]:
    """{"train", "test"} of an embedded dataset (``digits``, or ``digits_domains`` with ``domain``)."""
    from pnc.errors import DataError, did_you_mean

    if name == "digits":
        return load_digits(seed=seed)
    if name == "digits_domains":
        if domain not in DOMAINS:
            raise DataError(f"digits_domains needs a domain, got {domain!r}.{did_you_mean(str(domain), DOMAINS)}")
        return generate_digit_domains(seed=seed, domains=(domain,))[domain]
    raise DataError(f"{name!r} is not an embedded dataset.{did_you_mean(name, EMBEDDED_DATASETS)}")


def write_embedded(out_dir: str | Path, name: str, *, seed: int = 0) -> list[Path]:
    """Materialise an embedded dataset for the DVC stage: ``out_dir/{train,test}`` for ``digits``,
    ``out_dir/<domain>/{train,test}`` for ``digits_domains``; returns the written folders."""
    from pnc.data.store import write_split

    out_dir = Path(out_dir)
    # one group of splits per domain; load_embedded raises for a name that is not an embedded dataset
    groups = generate_digit_domains(seed=seed) if name == "digits_domains" else {"": load_embedded(name, seed=seed)}
    written = []
    for domain, splits in groups.items():
        for split_name, split in splits.items():
            manifest = {k: v for k, v in split.meta.items() if k != "index"}
            target = out_dir / domain / split_name if domain else out_dir / split_name
            write_split(target, split, manifest)
            written.append(target)
    return written
