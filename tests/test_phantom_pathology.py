"""Atlas phantoms: each phenomenon (pathology, contrast phase, artefact) appears, is labelled as
docs/phantom.md states, and leaves the organs it touches their labels. Phenomena are forced on
through make_atlas_phantom's prob and phase; grids are 4 mm so that each phantom takes seconds."""

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL, needs_real
from scipy import ndimage

import train
from atlas_phantom import (
    BOWEL_WALL,
    MASS,
    PHASE_PROBABILITIES,
    PROBABILITIES,
    LesionShape,
    _paint_kidney,
    _paint_mass,
    _pressed_not_engulfed,
    atlas_paths,
    load_atlas,
    load_source,
    load_sources,
    make_atlas_phantom,
    map_kind,
)
from phantom import PHASES, Canvas, Grid, make_phantom
from utils import UserError

OFF = {name: 0.0 for name in PROBABILITIES}
FLARE_OF_OURS = np.array([0, 1, 2, 13, 3], dtype=np.uint8)  # ours -> FLARE22: liver, R kidney, L kidney, spleen
BTCV_OF_OURS = np.array([0, 5, 2, 3, 1], dtype=np.uint8)  # ours -> BTCV: liver 5, R kidney 2, L kidney 3, spleen 1
SPACING = (4.0, 4.0, 4.0)


def _stand_in(seed: int, to: np.ndarray, aorta: int) -> tuple[np.ndarray, np.ndarray]:
    """A label map from a procedural phantom (4 mm) in another set's values, with an aorta in front of the spine."""
    _, ours, affine = make_phantom(seed, spacing=SPACING)
    mapped = to[ours]
    kidneys = np.argwhere((ours == 2) | (ours == 3)).mean(0)
    x, y, _ = np.ogrid[:ours.shape[0], :ours.shape[1], :ours.shape[2]]
    vessel = (x - (kidneys[0] - 3)) ** 2 + (y - (kidneys[1] + 6)) ** 2 < 9
    mapped[np.broadcast_to(vessel, mapped.shape) & (mapped == 0)] = aorta
    return mapped, affine


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A FLARE22-style folder, a BTCV-style folder (stored LPS, origin 0, as BTCV is) and a
    KiTS23-style folder (kidney, tumour and cyst, stored (z, y, x) IPL)."""
    root = tmp_path_factory.mktemp("sources")
    flare, btcv, kits = root / "flare", root / "btcv", root / "kits"
    for f in (flare, btcv, kits):
        f.mkdir()
    label, affine = _stand_in(3, FLARE_OF_OURS, 5)
    nib.save(nib.Nifti1Image(label, affine), flare / "FLARE22_Tr_0003.nii.gz")
    label, affine = _stand_in(4, BTCV_OF_OURS, 7)
    lps = np.diag([-4.0, -4.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(label[::-1, ::-1].copy(), lps), btcv / "label0004.nii.gz")
    z, y, x = np.ogrid[:40, :64, :64]
    kidney = ((z - 20) / 16) ** 2 + ((y - 32) / 10) ** 2 + ((x - 32) / 10) ** 2 < 1
    seg = kidney.astype(np.uint8)
    seg[((z - 12) ** 2 + (y - 32) ** 2 + (x - 40) ** 2) < 36] = 2  # a tumour bulging out of the kidney
    seg[((z - 28) ** 2 + (y - 32) ** 2 + (x - 30) ** 2) < 16] = 3  # a cyst
    ipl = np.array([[0, 0, -1.0, 0], [0, -1.0, 0, 0], [-2.0, 0, 0, 0], [0, 0, 0, 1]])  # axes: inferior, posterior, left
    nib.save(nib.Nifti1Image(seg, ipl), kits / "case_00001.nii.gz")
    return flare, btcv, kits


@pytest.fixture(scope="module")
def atlases(folders):
    found, _ = load_sources(f"{folders[0]},{folders[1]}")
    return found


def _phantom(atlases, seed=1, phase="portal", lesions=(), **on):
    info = {}
    hu, label, _ = make_atlas_phantom(seed, atlases, SPACING, lesions=lesions, prob={**OFF, **on}, phase=phase,
                                      info=info)
    return hu, label, info


def _dilate(mask, voxels=1):
    return ndimage.binary_dilation(mask, iterations=voxels)


def test_each_set_is_recognised_and_converted(folders):
    flare, btcv, kits = folders
    assert [map_kind(p) for p in (flare / "FLARE22_Tr_0003.nii.gz", btcv / "label0004.nii.gz",
                                  kits / "case_00001.nii.gz")] == ["flare22", "btcv", "kits23"]
    assert map_kind("x.nii.gz", {0, 1, 2, 3, 5, 13}) == "flare22" and map_kind("x.nii.gz", {0, 1, 2, 3}) == "kits23"
    assert map_kind("x.nii.gz", {0, 1, 2, 3, 5, 7}) == "btcv"
    b = load_atlas(str(btcv / "label0004.nii.gz"))  # BTCV values become FLARE22's, RAS
    assert {1, 2, 3, 5, 13} <= set(np.unique(b.label))
    x = {v: np.argwhere(b.label == v)[:, 0].mean() for v in (1, 2, 3, 13)}
    assert x[1] > x[3] and x[2] > x[13]  # liver right of spleen, right kidney right of left
    shapes = load_source(str(kits / "case_00001.nii.gz"))
    assert sorted(s.kind for s in shapes) == ["cyst", "tumour"]
    assert len(atlas_paths(f"{flare},{btcv},{kits}")) == 3
    atl, lesions = load_sources(f"{flare}, {kits}")
    assert len(atl) == 1 and len(lesions) == 2
    with pytest.raises(UserError, match="no organ maps"):
        load_sources(str(kits))
    with pytest.raises(UserError, match="gives lesion shapes only"):
        load_atlas(str(kits / "case_00001.nii.gz"))


def test_atlas_flag_takes_several_folders():
    args = train.parse_args(["--atlas", "a", "--atlas", "b,c"])
    assert args.atlas == "a,b,c" and train.parse_args([]).atlas == ""


def test_probabilities_are_probabilities():
    assert all(0 <= p <= 1 for p in PROBABILITIES.values())
    assert abs(sum(PHASE_PROBABILITIES.values()) - 1) < 1e-9 and set(PHASE_PROBABILITIES) == set(PHASES)


@pytest.mark.parametrize("phase", list(PHASES))
def test_every_phase_paints_its_calibrated_organs(atlases, phase):
    _, label, info = _phantom(atlases, phase=phase)
    painted = info["painted"]
    assert info["phase"] == phase
    for name, value in (("liver", 1), ("spleen", 4)):
        lo, hi = PHASES[phase][name]
        assert lo - 25 < np.median(painted[label == value]) < hi + 25  # +-15 HU of randomisation, texture, vessels
    kidney = (label == 2) | (label == 3)
    system = info["collecting"]
    assert system.any() and (system <= kidney).all()  # the collecting system is labelled kidney
    if phase == "excretory":
        assert painted[system].min() >= 250 and np.median(painted[system]) >= 300
        assert info["ureter"].any() and not label[info["ureter"]].any()  # ureters are background
        assert np.quantile(painted[info["ureter"]], 0.9) > 200  # opacified, but for collapsed stretches
    else:
        assert painted[system].max() <= 70 and not info["ureter"].any()


def test_lesions_inside_organs_keep_their_label(atlases):
    _, plain, _ = _phantom(atlases)
    hu, label, info = _phantom(atlases, liver_lesions=1.0, kidney_lesions=1.0, spleen_lesions=1.0)
    lesions = info["lesions"]
    assert lesions.sum() > 20 and np.array_equal(label, plain)
    assert (label[lesions] > 0).all()
    assert 0 <= info["painted"][lesions].min() and info["painted"][lesions].max() <= 1000


def test_mass_outside_organs_is_background_and_pressed_against_them(atlases):
    _, plain, _ = _phantom(atlases, seed=2)
    for seed in (2, 3):
        hu, label, info = _phantom(atlases, seed=seed, mass=1.0)
        mass = info["mass"]
        assert mass.sum() * 64 / 1000 > 0.5  # mL: at least a 1 cm sphere
        assert not label[mass].any()
        assert -5 <= info["painted"][mass].min() and info["painted"][mass].max() <= 170
        organs = info["organs"]
        assert ((organs > 0) & (organs != 20) & _dilate(mass, 2)).any()  # against an organ
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    changed = plain != _phantom(atlases, seed=2, mass=1.0)[1]
    near = ndimage.distance_transform_edt(~_phantom(atlases, seed=2, mass=1.0)[2]["mass"]) * 4.0 < 200
    assert (changed <= near).all()  # organs are pushed near the mass only


def test_a_mass_wrapped_in_an_organ_or_apart_from_its_anchor_is_refused():
    x, y, z = np.meshgrid(*[np.arange(40)] * 3, indexing="ij")
    ball = lambda cz: (x - 20) ** 2 + (y - 20) ** 2 + (z - cz) ** 2 < 36  # noqa: E731
    liver = np.zeros((40, 40, 40), np.uint8)
    liver[5:35, 5:35, 15:35] = 1
    inside, under, apart = liver.copy(), liver.copy(), liver.copy()
    inside[ball(25)] = MASS
    under[ball(9)] = MASS
    apart[ball(6)] = MASS
    apart[:, :, 13:16] = 0
    assert not _pressed_not_engulfed(inside, ball(25), (1,))
    assert _pressed_not_engulfed(under, ball(9), (1,))
    assert not _pressed_not_engulfed(apart, ball(6), (1,)) and _pressed_not_engulfed(apart, ball(6), ())


def test_a_mass_under_a_cupped_liver_touches_it_but_is_never_wrapped_in_it():
    # a liver whose underside is a cup, the hepatic site: every mass placed touches the liver and is not wrapped in it
    grid = Grid((50, 50, 50), (2.0, 2.0, 2.0), (-50.0, -50.0, -50.0))
    x, y, z = np.meshgrid(*[np.arange(50)] * 3, indexing="ij")
    organs = np.zeros(grid.shape, np.uint8)
    organs[5:45, 5:45, 20:45] = 1
    organs[(x - 25) ** 2 + (y - 25) ** 2 + (z - 20) ** 2 < 12 ** 2] = 0
    placed = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        work = organs.copy()
        mass = _paint_mass(Canvas(grid, rng), rng, work, np.ones(grid.shape, bool), "portal", site="hepatic")
        if not mass.any():
            continue
        placed += 1
        shell = _dilate(mass) & ~mass
        liver_share = (work[shell] == 1).mean()
        assert 0.03 <= liver_share <= 0.5
        assert (work[mass] == MASS).all() and (work == 1).sum() >= 0.5 * (organs == 1).sum()
    assert placed >= 4


def test_real_renal_lesion_shapes_straddle_the_kidney(atlases, folders):
    shapes = load_sources(f"{folders[0]},{folders[2]}")[1]
    tumour = [s for s in shapes if s.kind == "tumour"]
    ball = LesionShape("ball", "tumour", ((np.indices((9, 9, 9)) - 4) ** 2).sum(0) <= 16)
    landed = 0
    for seed in (1, 2, 3, 4):
        _, label, info = _phantom(atlases, seed=seed, lesions=tumour + [ball], renal_mass=1.0)
        pasted = info["renal_mass"]
        if not pasted.any():  # a small shape drawn at 0.6x can land off this toy map's kidney
            continue
        landed += 1
        inside = np.isin(label[pasted], [2, 3])
        assert inside.any()  # the intrarenal part keeps the kidney's label, the rest is background
        assert not label[pasted][~inside].any()
    assert landed >= 3


def test_ascites_is_background_fluid_around_the_organs(atlases):
    _, plain, _ = _phantom(atlases)
    hu, label, info = _phantom(atlases, ascites=1.0)
    fluid = info["ascites"]
    assert fluid.sum() > 50 and not label[fluid].any() and np.array_equal(label, plain)
    assert 0 <= info["painted"][fluid].min() and info["painted"][fluid].max() <= 25
    assert (fluid & _dilate((label == 1) | (label == 4), 2)).any()


@pytest.mark.parametrize("phase", ["native", "portal"])
def test_fatty_liver_is_darker_than_the_spleen(atlases, phase):
    _, label, info = _phantom(atlases, phase=phase, fatty_liver=1.0)
    painted = info["painted"]
    assert np.median(painted[label == 1]) < np.median(painted[label == 4]) - 8


@pytest.mark.parametrize("name, value", [("hepatomegaly", 1), ("splenomegaly", 4)])
def test_organomegaly_grows_the_organ_and_spares_the_others(atlases, name, value):
    _, plain, _ = _phantom(atlases)
    _, label, _ = _phantom(atlases, **{name: 1.0})
    assert (label == value).sum() > 1.25 * (plain == value).sum()
    for other in {1, 2, 3, 4} - {value}:
        assert (label == other).sum() == (plain == other).sum()


def test_atrophic_and_missing_kidneys(atlases):
    _, plain, _ = _phantom(atlases)
    count = {v: (plain == v).sum() for v in (1, 2, 3, 4)}
    _, label, _ = _phantom(atlases, atrophic_kidney=1.0)
    ratios = sorted((label == v).sum() / count[v] for v in (2, 3))
    assert 0.1 < ratios[0] < 0.7 and ratios[1] == 1.0
    _, label, _ = _phantom(atlases, missing_kidney=1.0)
    assert sorted(bool((label == v).any()) for v in (2, 3)) == [False, True]  # its label is removed
    assert all((label == v).sum() == count[v] for v in (1, 4))


def test_metal_and_streaks_leave_labels_alone(atlases):
    _, plain, _ = _phantom(atlases, seed=5)
    hu, label, info = _phantom(atlases, seed=5, metal=1.0)
    assert info["metal"].any() and info["painted"][info["metal"]].min() >= 2000
    assert hu.max() > 1000 and np.array_equal(label, plain)


def test_low_dose_noise(atlases):
    hu, label, info = _phantom(atlases, low_dose=1.0)
    deep = ndimage.binary_erosion(label == 1, iterations=3)
    residual = hu[deep].astype(np.float32) - ndimage.gaussian_filter(info["painted"], 1.0)[deep]
    assert residual.std() > 30


@needs_real
def test_real_btcv_and_kits_maps_load():
    btcv = load_atlas(str(atlas_paths(REAL / "btcv_labels")[0]))
    x = {v: np.argwhere(btcv.label == v)[:, 0].mean() for v in (1, 3)}
    assert x[1] > x[3] and 900 < (btcv.label == 1).sum() * 8 / 1000 < 3500  # liver on the right, 0.9-3.5 L
    shapes = load_source(str(atlas_paths(REAL / "kits23_labels")[0]))
    assert shapes and {s.kind for s in shapes} <= {"tumour", "cyst"}


def test_diaphragm_is_background_muscle_against_liver_and_spleen(atlases):
    shown = 0
    for seed in range(6):  # on these toy maps the scan's top can cut the dome away: most seeds show it
        _, label, info = _phantom(atlases, seed=seed, phase="portal")
        muscle = info["diaphragm"]
        if not muscle.any():
            continue
        shown += 1
        assert not label[muscle].any()
        lo, hi = PHASES["portal"]["muscle"]
        assert lo - 40 <= np.median(info["painted"][muscle]) <= hi + 40
        assert (muscle & _dilate(label == 1)).any() and (muscle & _dilate(label == 4)).any()  # no fat between
        liver = np.argwhere(label == 1)
        assert np.argwhere(muscle)[:, 2].mean() > liver[:, 2].mean() - 2  # the dome and flanks, not the underside
    assert shown >= 2


def test_colon_is_pressed_against_liver_and_lies_on_the_right_kidneys_fat(atlases):
    touching = {"liver": 0, "right kidney's fat": 0}
    for seed in range(8):
        _, label, info = _phantom(atlases, seed=seed)
        colon = info["colon"]
        assert not label[colon].any() and not (colon & info["perirenal"]).any()
        touching["liver"] += bool((colon & _dilate(label == 1)).any())
        touching["right kidney's fat"] += bool((colon & _dilate(info["perirenal"] & _dilate(label == 2, 4))).any())
    assert touching["liver"] >= 3 and touching["right kidney's fat"] >= 3, touching


def test_jejunum_enhances_like_the_spleen_and_stays_background(atlases):
    _, off_label, _ = _phantom(atlases, jejunum=0.0)
    _, label, info = _phantom(atlases, jejunum=1.0)
    loops = info["jejunum"]
    assert loops.sum() > 50 and not label[loops].any() and not (loops & info["perirenal"]).any()
    assert np.array_equal(label, off_label)  # the organs it touches keep every voxel
    lo, hi = BOWEL_WALL["portal"]
    wall = loops & ~ndimage.binary_erosion(loops)
    assert lo - 15 <= np.median(info["painted"][wall]) <= hi + 15  # the spleen's portal-phase range
    loops_x, liver_x, spleen_x = (np.argwhere(m)[:, 0].mean() for m in (loops, label == 1, label == 4))
    assert abs(loops_x - spleen_x) < abs(loops_x - liver_x)


def test_a_renal_sinus_one_column_wide_still_gets_a_pelvis():
    # a 10 mm-wide kidney: its sinus can be one column of voxels, all at the same distance toward the hilum
    hu_of = {k: float(np.mean(v)) for k, v in PHASES["excretory"].items()}
    grid = Grid((15, 15, 40), (2.0, 2.0, 2.0), (-14.0, -14.0, -40.0))
    organs = np.zeros(grid.shape, np.uint8)
    organs[5:10, 5:10, 5:35] = 2
    exits = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        exit_mm, system = _paint_kidney(Canvas(grid, rng), organs, 2, rng, hu_of, (300, 2500), 0.0, -200.0)
        if exit_mm is not None:
            exits += 1
            assert system.any() and not system[organs == 0].any()
    assert exits >= 2


def test_mass_margin_is_a_wall_and_a_fat_plane_labelled_background(atlases):
    for seed in (2, 3):
        _, plain, _ = _phantom(atlases, seed=seed, mass=1.0)
        hu, label, info = _phantom(atlases, seed=seed, mass=1.0, mass_margin=1.0)
        fat, mass = info["mass_fat"], info["mass"]
        assert fat.any() and not (fat & mass).any()
        assert not (fat & ~_dilate(mass)).any()  # one 4 mm voxel thick, next to the mass
        assert not label[fat].any() and not label[mass].any()
        assert -110 <= info["painted"][fat].min() and info["painted"][fat].max() <= -60
        assert np.array_equal(label[~fat], plain[~fat])  # the organs beside it keep their labels


def test_the_margin_draw_moves_no_other_draw(atlases):
    # with no mass, the margin's own draw changes nothing: phantoms without it are the phantoms drawn before it
    a = _phantom(atlases, seed=4, liver_lesions=1.0)
    b = _phantom(atlases, seed=4, liver_lesions=1.0, mass_margin=1.0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_margins_are_drawn_apart_from_the_slice_profile():
    # phantom_volume draws the slice profile from default_rng([seed, 1]); margins drawn from that stream would
    # come only with thin slices
    from atlas_phantom import LATE_STREAM

    seeds = range(400)
    thin = np.array([np.random.default_rng([s, 1]).uniform(0.5, 5.0) < 2.75 for s in seeds])
    margin = np.array([np.random.default_rng([s, LATE_STREAM]).random() < PROBABILITIES["mass_margin"] for s in seeds])
    assert 0.3 < (margin & ~thin).sum() / (~thin).sum() < 0.7
