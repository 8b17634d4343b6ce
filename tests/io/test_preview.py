"""`ctgen.io.preview`: three-plane PNGs with one row per volume."""
import numpy as np
from PIL import Image

from ctgen.io.preview import CAPTION_HEIGHT, three_plane_grid, write_planes, write_three_planes


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
