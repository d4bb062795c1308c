"""visualize.py: surfaces (closed, true volume, world RAS), videos and stills (frames, colours, which
side the liver is on), meshes for Slicer, and the errors a user meets."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
sys.path.insert(0, str(ROOT))

import visualize  # noqa: E402
from phantom import make_phantom, reorient_for_writing  # noqa: E402
from utils import ORGANS, UserError, run_cli, save_nifti  # noqa: E402

SIZE = (320, 240)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER = (1000, 600)  # window of the browser screenshots (pixels)


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory) -> dict[str, Path]:
    """A 4 mm phantom's label map and CT, stored in RAS and in LPS."""
    root = tmp_path_factory.mktemp("phantom")
    hu, label, affine = make_phantom(5, spacing=(4.0, 4.0, 4.0))
    save_nifti(root / "label.nii.gz", label, affine)
    save_nifti(root / "ct.nii.gz", hu, affine)
    _, label_lps, affine_lps = reorient_for_writing(hu, label, affine, "LPS")
    save_nifti(root / "label_lps.nii.gz", label_lps, affine_lps)
    return {"label": root / "label.nii.gz", "ct": root / "ct.nii.gz", "label_lps": root / "label_lps.nii.gz"}


def run(*argv: str) -> None:
    visualize.main(visualize.parse_args(["--quiet", *[str(a) for a in argv]]))


def read_video(path: Path) -> tuple[list[np.ndarray], dict]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    w, h = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in reader]
    return frames, meta


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def organ_pixels(image: np.ndarray, panes: int = 1, pane: int = 0) -> dict[str, np.ndarray]:
    """{organ: x positions (pixels, within the pane) of the pixels of its colour}, found by hue
    (shading scales brightness, not hue), with the legend and the axes marker masked out."""
    from matplotlib.colors import rgb_to_hsv

    h, w = image.shape[:2]
    pw = w // panes
    view = image[:, pane * pw:(pane + 1) * pw].astype(np.float64) / 255.0
    hsv = rgb_to_hsv(view)
    scene = np.ones((h, pw), dtype=bool)
    x0, y0, _, _ = visualize.legend_rect(4, len("12,345 mL   Dice 0.00"), (pw, h))  # the widest legend
    scene[: h - y0 + 2, max(0, x0 - 2):] = False
    x0, y0, x1, y1 = visualize.AXES_VIEWPORT
    scene[int(h * (1 - y1)) - 2:, : int(np.ceil(pw * x1)) + 2] = False
    return colour_pixels(hsv, scene)


def colour_pixels(hsv: np.ndarray, scene: np.ndarray) -> dict[str, np.ndarray]:
    """{organ: x positions of the pixels of its hue} within scene (bool mask) of an HSV image."""
    from matplotlib.colors import rgb_to_hsv

    out = {}
    for organ, color in visualize.COLORS.items():
        target = rgb_to_hsv(np.array(color))[0]
        dist = np.abs(hsv[..., 0] - target)
        dist = np.minimum(dist, 1 - dist)
        hit = scene & (hsv[..., 1] > 0.35) & (hsv[..., 2] > 0.12) & (dist < 0.035)
        out[organ] = np.nonzero(hit)[1]
    return out


def assert_anterior(image: np.ndarray, organs=("liver", "right_kidney", "left_kidney", "spleen"),
                    panes: int = 1, pane: int = 0) -> None:
    found = organ_pixels(image, panes, pane)
    for organ in organs:
        assert found[organ].size > 20, f"no {organ} colour in the frame"
    # Seen from the front the patient's right is on the viewer's left.
    assert found["liver"].mean() < found["spleen"].mean()
    assert found["right_kidney"].mean() < found["left_kidney"].mean()


# ---------------------------------------------------------------------------------------------
# Surfaces


def ellipsoid(shape, spacing, radii_mm) -> tuple[np.ndarray, np.ndarray]:
    """A binary ellipsoid centred in the grid and an LAS affine (a mirroring one)."""
    idx = np.indices(shape).astype(np.float64)
    centre = (np.array(shape) - 1) / 2.0
    r2 = sum(((idx[k] - centre[k]) * spacing[k] / radii_mm[k]) ** 2 for k in range(3))
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [40.0, -30.0, 100.0]
    return r2 <= 1.0, affine


@pytest.mark.parametrize("voxel_mm", [0.0, 1.2])
def test_surface_is_closed_with_true_volume_and_position(voxel_mm):
    mask, affine = ellipsoid((70, 60, 30), (0.6, 0.7, 1.6), (18.0, 14.0, 20.0))
    mesh = visualize.mask_surface(mask, affine, voxel_mm=voxel_mm)
    assert mesh.n_open_edges == 0 and mesh.is_manifold
    voxel_ml = mask.sum() * 0.6 * 0.7 * 1.6 / 1000
    assert mesh.volume / 1000 == pytest.approx(voxel_ml, rel=0.05)
    centre = affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]
    np.testing.assert_allclose(mesh.center, centre, atol=1.0)
    # Normals point outwards even though the affine mirrors x.
    outward = (np.asarray(mesh.points) - centre) * np.asarray(mesh.point_data["Normals"])
    assert (outward.sum(1) > 0).mean() > 0.95


def test_surface_of_an_organ_cut_by_the_edge_is_closed():
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[:10, 5:15, 5:15] = True  # touches the volume's first face
    mesh = visualize.mask_surface(mask, np.eye(4), voxel_mm=0.0, smooth_iter=0)
    assert mesh.n_open_edges == 0
    assert mesh.volume == pytest.approx(1000, rel=0.05)


def test_empty_mask_has_no_surface():
    assert visualize.mask_surface(np.zeros((5, 5, 5), dtype=bool), np.eye(4)) is None


def test_organ_volumes_in_ml():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[:5] = 1
    labels[5:, :2] = 4
    vols = visualize.organ_volumes(labels, np.diag([2.0, 2.0, 2.5, 1.0]))
    assert vols == pytest.approx({"liver": 5.0, "right_kidney": 0.0, "left_kidney": 0.0, "spleen": 1.0})


# ---------------------------------------------------------------------------------------------
# Video, still, meshes


def test_video_of_a_phantom(phantom_files, tmp_path):
    out, png = tmp_path / "organs.mp4", tmp_path / "still.png"
    run("--input", phantom_files["label"], "--output", out, "--png", png, "--frames", 8, "--fps", 10,
        "--size", f"{SIZE[0]}x{SIZE[1]}")
    frames, meta = read_video(out)
    assert len(frames) == 8 and tuple(meta["size"]) == SIZE
    assert meta["fps"] == 10
    for frame in frames:
        assert frame.mean() > 40 and frame.std() > 10  # not black, not blank
    assert_anterior(frames[0])
    still = read_png(png)
    assert still.shape == (SIZE[1], SIZE[0], 3)
    assert_anterior(still)
    # Half an orbit later the camera looks from behind: the sides swap.
    back = organ_pixels(frames[4])
    assert back["liver"].mean() > back["spleen"].mean()
    assert sorted(tmp_path.iterdir()) == sorted([out, png])  # no temporary files left


def test_sides_hold_for_an_lps_file(phantom_files, tmp_path):
    png = tmp_path / "lps.png"
    run("--input", phantom_files["label_lps"], "--png", png, "--size", f"{SIZE[0]}x{SIZE[1]}")
    assert_anterior(read_png(png))


def test_reference_side_by_side_and_ct_context(phantom_files, tmp_path):
    png = tmp_path / "compare.png"
    run("--input", phantom_files["label"], "--reference", phantom_files["label"], "--png", png,
        "--size", "480x240", "--organs", "liver,spleen")
    still = read_png(png)
    for pane in (0, 1):
        found = organ_pixels(still, panes=2, pane=pane)
        assert found["liver"].size > 20 and found["spleen"].size > 20
        assert found["liver"].mean() < found["spleen"].mean()
        assert found["right_kidney"].size == 0  # not asked for
    ct_png = tmp_path / "ct.png"
    run("--input", phantom_files["label"], "--ct", phantom_files["ct"], "--png", ct_png, "--size", "320x240")
    assert read_png(ct_png).shape == (240, 320, 3)


def test_reference_shows_what_the_prediction_misses(phantom_files, tmp_path):
    import nibabel as nib

    img = nib.load(phantom_files["label"])
    pred = np.asarray(img.dataobj).copy()
    pred[pred == 4] = 0  # the prediction misses the spleen
    save_nifti(tmp_path / "pred.nii.gz", pred, img.affine)
    png = tmp_path / "compare.png"
    run("--input", tmp_path / "pred.nii.gz", "--reference", phantom_files["label"], "--png", png, "--size", "480x240")
    still = read_png(png)
    assert organ_pixels(still, panes=2, pane=0)["spleen"].size == 0
    assert organ_pixels(still, panes=2, pane=1)["spleen"].size > 20
    with pytest.raises(UserError, match="no voxels of spleen in either"):
        run("--input", tmp_path / "pred.nii.gz", "--reference", tmp_path / "pred.nii.gz", "--png", png,
            "--organs", "liver,spleen", "--overwrite")


def test_ct_of_another_patient_is_refused(phantom_files, tmp_path):
    import nibabel as nib

    img = nib.load(phantom_files["ct"])
    moved = img.affine.copy()
    moved[:3, 3] += 1000.0  # a CT somewhere else in the scanner's space
    save_nifti(tmp_path / "far.nii.gz", np.asarray(img.dataobj), moved)
    with pytest.raises(UserError, match="lies outside this CT's body"):
        run("--input", phantom_files["label"], "--ct", tmp_path / "far.nii.gz", "--png", tmp_path / "a.png")
    with pytest.raises(UserError, match="is this a CT in HU"):
        run("--input", phantom_files["label"], "--ct", phantom_files["label"], "--png", tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_context_surfaces_of_a_ct(phantom_files):
    context = dict(visualize.context_surfaces(phantom_files["ct"], smooth_iter=10))
    assert set(context) == {"body", "bone"}
    assert context["body"].n_open_edges == 0
    # The body holds the organs: the phantom's body is 27-37 cm wide.
    xmin, xmax = context["body"].bounds[:2]
    assert 250 < xmax - xmin < 400


@pytest.mark.parametrize("fmt", ["stl", "ply", "obj"])
def test_mesh_export_for_slicer(phantom_files, tmp_path, fmt):
    import pyvista as pv

    folder = tmp_path / "meshes"
    run("--input", phantom_files["label"], "--mesh", folder, "--mesh-format", fmt)
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(f"{o}.{fmt}" for o in ("liver", "right_kidney", "left_kidney", "spleen"))
    labels, affine = visualize.read_labels(phantom_files["label"], "identity")
    volumes = visualize.organ_volumes(labels, affine)
    for organ in ("liver", "spleen"):
        path = folder / f"{organ}.{fmt}"
        mesh = pv.read(path).clean()
        assert mesh.n_open_edges == 0
        assert mesh.volume / 1000 == pytest.approx(volumes[organ], rel=0.05)
        head = path.read_bytes()[:400]
        assert b"SPACE=RAS" in head  # Slicer reads this, else it assumes LPS
    # World RAS: the liver is on the patient's right (+x), the spleen on the left.
    assert pv.read(folder / f"liver.{fmt}").center[0] > pv.read(folder / f"spleen.{fmt}").center[0]


# ---------------------------------------------------------------------------------------------
# Web page (--html), loaded in a real browser


def browser_screenshot(page: Path, out: Path, fragment: str = "") -> np.ndarray:
    """Headless Chromium opens page from disk with every host name unresolvable (so the page must
    work offline), draws its WebGL with SwiftShader and saves a screenshot: (H, W, 3) uint8."""
    if CHROMIUM is None:
        pytest.skip("chromium is absent (apt-get install chromium)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader",
           "--enable-unsafe-swiftshader", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND",
           f"--user-data-dir={out.parent / (out.stem + '-profile')}", f"--screenshot={out}",
           f"--window-size={BROWSER[0]},{BROWSER[1]}", "--virtual-time-budget=10000", page.as_uri() + fragment]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.exists(), f"chromium wrote no screenshot: {result.stderr[-2000:]}"
    return read_png(out)


def assert_page_shows(image: np.ndarray, shown, hidden=()) -> None:
    """The organs shown are on the screenshot (by hue: vtk.js lights them its own way), the hidden
    ones are not, and the front view has the patient's right on the viewer's left. The legend card
    (upper right), whose colour swatches would count, is masked out."""
    from matplotlib.colors import rgb_to_hsv

    h, w = image.shape[:2]
    scene = np.ones((h, w), dtype=bool)
    scene[:180, w - 340:] = False
    found = colour_pixels(rgb_to_hsv(image.astype(np.float64) / 255.0), scene)
    for organ in shown:
        assert found[organ].size > 100, f"no {organ} colour on the page"
    for organ in hidden:
        assert found[organ].size < 20, f"{organ} is on the page though hidden"
    if {"liver", "spleen"} <= set(shown):
        assert found["liver"].mean() < found["spleen"].mean()


def assert_offline(text: str) -> None:
    """No http(s) address that the page would fetch: none in a src= or href= (in the markup, or set
    from script), none that the tool's own, wider scan finds."""
    assert not re.findall(r"""(?:src|href)\s*(?:=|["']\s*,)\s*["'`]?\s*(?:https?:)?//""", text, re.IGNORECASE)
    assert visualize.loaded_urls(text) == []


def test_loaded_urls_are_what_a_page_fetches():
    page = """<script src="https://cdn.example/x.js"></script><link rel="stylesheet" href='//fonts.example/a.css'>
    <style>body { background: url( "http://img.example/b.png") }</style>
    <script>import("https://esm.example/m.js"); e.setAttribute("href",`https://icons.example/i.png`)</script>
    <!-- see https://docs.example/ --><p>Copyright: http://www.example.com/Copyright.htm</p>"""
    assert visualize.loaded_urls(page) == ["https://cdn.example/x.js", "//fonts.example/a.css",
                                           "http://img.example/b.png", "https://esm.example/m.js",
                                           "https://icons.example/i.png"]


def test_html_page_of_a_phantom(phantom_files, tmp_path):
    page = tmp_path / "organs.html"
    run("--input", phantom_files["label"], "--html", page)
    assert [p.name for p in tmp_path.iterdir()] == ["organs.html"]  # one file, no temporary left
    text = page.read_text()
    assert_offline(text)
    labels, affine = visualize.read_labels(phantom_files["label"], "identity")
    for organ, ml in visualize.organ_volumes(labels, affine).items():
        assert f'data-organ="{organ}"' in text and f"{ml:,.0f} mL" in text  # the legend, a checkbox each
    assert_page_shows(browser_screenshot(page, tmp_path / "all.png"), ORGANS)
    # The checkboxes hide organs; '#hide=' unticks them as the page opens.
    assert_page_shows(browser_screenshot(page, tmp_path / "some.png", "#hide=liver,left_kidney"),
                      ["right_kidney", "spleen"], hidden=["liver", "left_kidney"])


def test_html_page_with_reference_and_ct(phantom_files, tmp_path):
    page = tmp_path / "compare.html"
    run("--input", phantom_files["label"], "--reference", phantom_files["label"], "--ct", phantom_files["ct"],
        "--html", page, "--organs", "liver,spleen")
    text = page.read_text()
    assert_offline(text)
    for pane in (0, 1):  # a legend per pane: the organs asked for, then the CT's body and bones
        organs = re.findall(rf'data-pane="{pane}" data-organ="(\w+)"', text)
        assert organs == ["liver", "spleen", "body", "bones"]
    assert "Dice 1.00" in text and ">prediction<" in text and ">reference<" in text


def test_html_without_trame_vtk_is_a_clear_error(phantom_files, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trame_vtk" else
                        find_spec(name, *a))
    with pytest.raises(UserError, match="--html needs trame-vtk"):
        run("--input", phantom_files["label"], "--html", tmp_path / "a.html")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# A mask without organs


def test_mask_without_organs_gives_an_empty_scene(phantom_files, tmp_path, capsys):
    """A scan without organs is a result: every output is written, with a note, and the exit
    status is 0, so that infer.py then visualize.py in a script goes on."""
    empty = tmp_path / "empty.nii.gz"
    save_nifti(empty, np.zeros((10, 10, 10), dtype=np.uint8), np.diag([3.0, 3.0, 3.0, 1.0]))
    out = tmp_path / "out"
    out.mkdir()
    run_cli(visualize.main, visualize.parse_args([
        "--input", str(empty), "--output", str(out / "a.mp4"), "--png", str(out / "a.png"),
        "--html", str(out / "a.html"), "--mesh", str(out / "meshes"), "--frames", "2", "--size", "320x240"]))
    err = capsys.readouterr().err
    assert "no organ in the mask" in err and "no mesh written" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.html", "a.mp4", "a.png", "meshes"]
    assert list((out / "meshes").iterdir()) == []
    frames, _ = read_video(out / "a.mp4")
    assert len(frames) == 2
    assert all(v.size == 0 for v in organ_pixels(read_png(out / "a.png")).values())
    text = (out / "a.html").read_text()
    assert "no organ in the mask" in text and 'class="abv-organ"' not in text
    # Beside a reference with organs: the empty pane says so, the other shows them.
    png = out / "cmp.png"
    run("--input", empty, "--reference", phantom_files["label"], "--png", png, "--size", "480x240")
    assert all(v.size == 0 for v in organ_pixels(read_png(png), panes=2, pane=0).values())
    assert organ_pixels(read_png(png), panes=2, pane=1)["liver"].size > 20


# ---------------------------------------------------------------------------------------------
# Label maps and errors


def test_totalseg_label_map(tmp_path):
    labels = np.zeros((20, 20, 20), dtype=np.int16)
    labels[2:8, 2:8, 2:8] = 5  # liver
    labels[12:16, 2:6, 2:6] = 1  # spleen
    labels[2:6, 12:16, 2:6] = 2  # right kidney
    labels[12:16, 12:16, 2:6] = 3  # left kidney
    labels[10:12, 10:12, 10:18] = 52  # another structure: background for us
    save_nifti(tmp_path / "ts.nii.gz", labels, np.eye(4))
    ours, _ = visualize.read_labels(tmp_path / "ts.nii.gz", "totalseg")
    assert np.bincount(ours.ravel()).tolist() == [8000 - 216 - 3 * 64, 216, 64, 64, 64]


def test_errors(phantom_files, tmp_path):
    liver_only = tmp_path / "liver.nii.gz"
    save_nifti(liver_only, np.pad(np.ones((4, 4, 4), dtype=np.uint8), 2), np.eye(4))
    with pytest.raises(UserError, match="no voxels of right_kidney, spleen"):
        run("--input", liver_only, "--output", tmp_path / "a.mp4", "--organs", "liver,spleen,right_kidney")
    with pytest.raises(UserError, match="unknown organ 'heart'"):
        run("--input", liver_only, "--output", tmp_path / "a.mp4", "--organs", "liver,heart")
    probs = tmp_path / "probs.nii.gz"
    save_nifti(probs, np.full((8, 8, 8), 0.5, dtype=np.float32), np.eye(4))
    with pytest.raises(UserError, match="not whole numbers"):
        run("--input", probs, "--output", tmp_path / "a.mp4")
    other = tmp_path / "other.nii.gz"
    save_nifti(other, np.full((8, 8, 8), 7, dtype=np.uint8), np.eye(4))
    with pytest.raises(UserError, match=r"values \[7\] are not in the 'identity' label map"):
        run("--input", other, "--output", tmp_path / "a.mp4")
    ct = tmp_path / "ct.nii.gz"
    save_nifti(ct, np.full((8, 8, 8), -1000, dtype=np.int16), np.eye(4))
    with pytest.raises(UserError, match="values go down to -1000, as in a CT"):
        run("--input", ct, "--output", tmp_path / "a.mp4")
    with pytest.raises(UserError, match="the folder .*missing does not exist"):
        run("--input", phantom_files["label"], "--output", tmp_path / "missing" / "a.mp4")
    with pytest.raises(UserError, match="must end in .mp4; for a still image use --png"):
        run("--input", phantom_files["label"], "--output", tmp_path / "a.gif")
    with pytest.raises(UserError, match="nothing to write"):
        run("--input", phantom_files["label"])
    with pytest.raises(UserError, match="must be even"):
        run("--input", phantom_files["label"], "--output", tmp_path / "a.mp4", "--size", "321x240")
    with pytest.raises(UserError, match="must end in .html"):
        run("--input", phantom_files["label"], "--html", tmp_path / "a.htm")
    (tmp_path / "old.html").write_text("old")
    with pytest.raises(UserError, match="old.html: exists; pass --overwrite"):
        run("--input", phantom_files["label"], "--html", tmp_path / "old.html")
    assert (tmp_path / "old.html").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "liver.nii.gz", "old.html", "other.nii.gz",
                                                         "probs.nii.gz"]


def test_error_is_one_line_and_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(visualize.main, visualize.parse_args(["--input", str(tmp_path / "nope.nii.gz"),
                                                      "--output", str(tmp_path / "a.mp4")]))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope.nii.gz" in err[0]


def test_read_only_folder(phantom_files, tmp_path):
    import os
    import tempfile

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders; sysfs refuses even root
        folder = Path("/sys")
    try:
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
            os.close(fd)
            os.unlink(probe)
            pytest.skip(f"{folder} is writable here")
        except OSError:
            pass
        with pytest.raises(UserError, match=f"cannot write in {folder}"):
            run("--input", phantom_files["label"], "--output", folder / "a.mp4")
        with pytest.raises(UserError, match=f"cannot write in {folder}"):
            run("--input", phantom_files["label"], "--mesh", folder / "meshes")
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_missing_opengl_is_a_clear_error(monkeypatch):
    import ctypes

    if not sys.platform.startswith("linux"):
        pytest.skip("the EGL/OSMesa choice is made on Linux only")

    def no_library(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")

    for var in ("DISPLAY", "WAYLAND_DISPLAY", "VTK_DEFAULT_OPENGL_WINDOW"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    with pytest.raises(UserError, match="apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri"):
        visualize._use_headless_gl()


def test_no_partial_video_when_rendering_fails(phantom_files, tmp_path, monkeypatch):
    def broken(plotter, orbit, azimuths):
        for k, _ in enumerate(azimuths):
            if k == 3:
                raise RuntimeError("render failed")
            yield np.zeros((SIZE[1], SIZE[0], 3), dtype=np.uint8)

    monkeypatch.setattr(visualize, "render_frames", broken)
    with pytest.raises(RuntimeError):
        run("--input", phantom_files["label"], "--output", tmp_path / "a.mp4", "--frames", 6,
            "--size", f"{SIZE[0]}x{SIZE[1]}")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Real data


@pytest.mark.skipif(not (REAL / "ircad_p1").exists(), reason="../shared/data/real is absent")
def test_ircad_video(tmp_path):
    """The full default video of IRCAD patient 1 (512x512x129, LPS): 120 frames at 1280x720."""
    out = tmp_path / "ircad.mp4"
    run("--input", REAL / "ircad_p1" / "label.nii.gz", "--output", out)
    frames, meta = read_video(out)
    assert len(frames) == 120 and tuple(meta["size"]) == (1280, 720)
    assert min(float(f.std()) for f in frames) > 10
    assert_anterior(frames[0])
    for k in (30, 60, 90):
        assert sum(v.size > 0 for v in organ_pixels(frames[k]).values()) >= 2


@pytest.mark.skipif(not (REAL / "ircad_p1").exists(), reason="../shared/data/real is absent")
def test_ircad_html_page(tmp_path):
    """IRCAD patient 1's label (LPS) as a web page: offline, and Chromium shows the four organs."""
    page = tmp_path / "ircad.html"
    run("--input", REAL / "ircad_p1" / "label.nii.gz", "--html", page)
    assert_offline(page.read_text())
    assert_page_shows(browser_screenshot(page, tmp_path / "ircad.png"), ORGANS)


@pytest.mark.skipif(not (REAL / "totalseg_example").exists(), reason="../shared/data/real is absent")
def test_totalseg_example_still(tmp_path):
    png = tmp_path / "ts.png"
    run("--input", REAL / "totalseg_example" / "segmentation.nii.gz", "--label-map", "totalseg", "--png", png,
        "--size", "640x360")
    assert_anterior(read_png(png))


def test_quicklook_centre_is_the_centre_of_mass():
    from scipy import ndimage

    lab = np.zeros((20, 16, 12), np.uint8)
    lab[3:9, 2:14, 5:7] = 1
    lab[15:18, 4:6, 1:11] = 3
    assert np.array_equal(visualize._organ_centre(np.asfortranarray(lab)), np.round(ndimage.center_of_mass(lab > 0)))
    assert np.array_equal(visualize._organ_centre(np.zeros((4, 6, 8), np.uint8)), [2, 3, 4])
