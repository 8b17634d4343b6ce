"""`ctgen.io.preview`: three-plane PNGs with one row per volume."""
import numpy as np
from PIL import Image

from ctgen.io.preview import CAPTION_HEIGHT, caption_lines, caption_width, three_plane_grid, write_planes, write_three_planes
from ctgen.volume import LUNG_WINDOW, MEDIASTINAL_WINDOW


def test_rows_of_different_sizes_and_grey_levels():
    small = np.full((5, 8, 8), -1.0, np.float32)  # air
    big = np.zeros((9, 16, 12), np.float32)       # water
    big[4, 3, 2] = 1.0
    grid = three_plane_grid(small, big, np.full((9, 16, 12), 2.0, np.float32), pad=2)
    # columns: axial (W), coronal (W), sagittal (H) of the widest volume; rows: tallest plane per volume
    assert grid.shape == (2 + 8 + 2 + 16 + 2 + 16 + 2, 2 + 12 + 2 + 12 + 2 + 16 + 2)
    assert grid[2, 2] == 0 and grid[2 + 8 + 2, 2] == 128  # -1 -> black, 0 -> mid grey (127.5 rounds up)
    assert grid[2 + 8 + 2 + 3, 2 + 2] == 255  # the middle axial slice (index 4) of `big`, row 3, column 2
    assert grid[-3, 2] == 255  # values above 1 are clipped to white


def test_written_pngs(tmp_path):
    vol = np.linspace(-1, 1, 9 * 16 * 16, dtype=np.float32).reshape(9, 16, 16)
    path = write_planes(str(tmp_path / "a" / "p.png"), [vol, vol, vol], caption="three rows")
    img = np.asarray(Image.open(path))
    grid = three_plane_grid(vol, vol, vol)
    zoom = round(640 / grid.shape[1])
    assert img.shape == (grid.shape[0] * zoom + CAPTION_HEIGHT, grid.shape[1] * zoom)
    np.testing.assert_array_equal(img[CAPTION_HEIGHT::zoom, ::zoom], grid)
    assert img[:CAPTION_HEIGHT].any()  # the caption
    path = write_three_planes(str(tmp_path / "r.png"), vol, vol * 0.5, title="step 1")
    two_rows = np.asarray(Image.open(path))
    np.testing.assert_array_equal(two_rows[CAPTION_HEIGHT::zoom, ::zoom], three_plane_grid(vol, vol * 0.5))


def test_preview_windows(tmp_path):
    vol = np.full((5, 8, 8), 0.1, np.float32)  # 100 HU: soft tissue
    vol[:, :, :4] = -0.6  # -600 HU: the lung window's level
    grid = three_plane_grid(vol, vol, pad=0, windows=[LUNG_WINDOW, MEDIASTINAL_WINDOW])
    axial_lung, axial_soft = grid[:8, :8], grid[8:, :8]
    assert axial_lung[0, 0] == 128 and abs(int(axial_lung[0, 7]) - 255 * (100 + 1350) / 1500) <= 1
    assert axial_soft[0, 0] == 0 and abs(int(axial_soft[0, 7]) - 255 * (100 + 125) / 350) <= 1
    caption = "word " * 200
    img = np.asarray(Image.open(write_planes(str(tmp_path / "p.png"), [vol], caption=caption)))
    plain = three_plane_grid(vol)
    zoom = round(640 / plain.shape[1])
    lines = caption_lines(caption, plain.shape[1] * zoom)
    assert len(lines) > 2 and img.shape[0] == plain.shape[0] * zoom + CAPTION_HEIGHT * len(lines)


def test_caption_lines_fit_their_width_and_keep_every_word():
    caption = "70 years old female: Cardiomegaly. Moderate right pleural effusion. " * 6
    lines = caption_lines(caption, 300)
    assert len(lines) > 3 and " ".join(lines) == " ".join(caption.split())
    assert all(caption_width(line) <= 296 for line in lines)
    # each line is full: its next word would not have fitted
    assert all(caption_width(a + " " + b.split()[0]) > 296 for a, b in zip(lines, lines[1:]))
    # words stand at least 4 px apart (the built-in fonts' own space is about 2 px)
    assert caption_width("70 years") >= caption_width("70") + caption_width("years") + 4
    assert caption_lines("", 300) == [""] and caption_lines("x" * 200, 300) == ["x" * 200]
