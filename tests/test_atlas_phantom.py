"""Atlas phantoms (organ shapes from FLARE22 label maps) and training on phantoms streamed per epoch."""

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REAL, needs_real

import atlas_phantom
import train
from atlas_phantom import atlas_paths, load_atlas, make_atlas_phantom, phantom_volume
from phantom import make_phantom
from utils import UserError

FLARE_OF_OURS = np.array([0, 1, 2, 13, 3], dtype=np.uint8)  # ours -> FLARE22: liver, R kidney, L kidney, spleen


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory):
    """Two FLARE22-style maps made from procedural phantoms (at 4 mm), with an aorta (label 5) in
    front of the spine: stand-ins for real label maps, so these tests need no shared data."""
    folder = tmp_path_factory.mktemp("atlas")
    for seed in (3, 4):
        _, ours, affine = make_phantom(seed, spacing=(4.0, 4.0, 4.0))
        flare = FLARE_OF_OURS[ours]
        kidneys = np.argwhere((ours == 2) | (ours == 3)).mean(0)
        x, y, _ = np.ogrid[:ours.shape[0], :ours.shape[1], :ours.shape[2]]
        aorta = (x - (kidneys[0] - 3)) ** 2 + (y - (kidneys[1] + 6)) ** 2 < 9
        flare[np.broadcast_to(aorta, flare.shape) & (flare == 0)] = 5
        nib.save(nib.Nifti1Image(flare, affine), folder / f"FLARE22_Tr_{seed:04d}.nii.gz")
    return folder


def test_atlas_phantom_is_reproducible_and_anatomical(atlas_dir):
    atlases = [load_atlas(str(p)) for p in atlas_paths(atlas_dir)]
    hu, label, affine = make_atlas_phantom(11, atlases, (4.0, 4.0, 4.0))
    hu2, label2, _ = make_atlas_phantom(11, atlases, (4.0, 4.0, 4.0))
    assert np.array_equal(hu, hu2) and np.array_equal(label, label2)
    assert hu.dtype == np.int16 and label.dtype == np.uint8 and hu.shape == label.shape
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    # RAS: the right kidney (2) and the liver (1) lie at larger x (the patient's right) than the left kidney and spleen.
    x = {c: np.argwhere(label == c)[:, 0].mean() for c in (1, 2, 3, 4)}
    assert x[2] > x[3] and x[1] > x[4]
    assert np.allclose(np.diag(affine)[:3], 4.0)


def test_atlas_errors_name_the_file(atlas_dir, tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        atlas_paths(tmp_path / "missing")
    with pytest.raises(UserError, match="holds no .nii.gz"):
        atlas_paths(tmp_path)
    bad = tmp_path / "no_aorta.nii.gz"
    img = nib.load(atlas_paths(atlas_dir)[0])
    data = np.asarray(img.dataobj).copy()
    data[data == 5] = 0
    nib.save(nib.Nifti1Image(data, img.affine), bad)
    with pytest.raises(UserError, match=r"no_aorta.nii.gz: no aorta"):
        load_atlas(str(bad))


def test_phantom_volume_is_on_the_training_grid(atlas_dir):
    vol = phantom_volume(5, "atlas", 6.0, (-200.0, 400.0), str(atlas_dir))
    assert vol.image.shape == vol.label.shape and np.allclose(np.diag(vol.affine)[:3], 6.0)
    assert vol.image.min() >= -200 and vol.image.max() <= 400
    assert {1, 2, 3, 4} <= set(np.unique(vol.label))


def test_phantom_prob_overrides_the_phenomena_and_rejects_typos(atlas_dir, capsys):
    assert atlas_phantom.parse_probabilities("") == {}
    assert atlas_phantom.parse_probabilities("mass=0.6, fatty_liver=0") == {"mass": 0.6, "fatty_liver": 0.0}
    for bad in ("mas=0.5", "mass=1.5", "mass=high", "mass"):
        with pytest.raises(UserError, match="give NAME=P with P from 0 to 1"):
            atlas_phantom.parse_probabilities(bad)
    with pytest.raises(SystemExit):
        train.parse_args(["--phantom-prob", "mas=0.5"])
    assert "--phantom-prob 'mas=0.5'" in capsys.readouterr().err
    assert train.parse_args(["--phantom-prob", "metal=1"]).phantom_prob == "metal=1"
    # Metal forced on paints streaks of thousands of HU somewhere; forced off, the same seed has none.
    on = phantom_volume(5, "atlas", 6.0, (-1000.0, 3000.0), str(atlas_dir), "metal=1")
    off = phantom_volume(5, "atlas", 6.0, (-1000.0, 3000.0), str(atlas_dir), "metal=0")
    assert on.image.max() > 1500 > off.image.max()


def test_phantom_prob_sets_phase_probabilities_and_keeps_the_rest_in_proportion(atlas_dir):
    assert atlas_phantom.phase_probabilities() == pytest.approx(atlas_phantom.PHASE_PROBABILITIES)
    phases = atlas_phantom.phase_probabilities(atlas_phantom.parse_probabilities("mass=0.9,native=0.45"))
    default = atlas_phantom.PHASE_PROBABILITIES
    assert phases["native"] == pytest.approx(0.45) and sum(phases.values()) == pytest.approx(1)
    assert phases["portal"] / phases["arterial"] == pytest.approx(default["portal"] / default["arterial"])
    with pytest.raises(UserError, match="add up to more than 1"):
        atlas_phantom.parse_probabilities("native=0.7,portal=0.5")
    # Forced to one phase, every seed draws it; the phenomena drawn stay those of the seed.
    for seed in range(3):
        info, base = {}, {}
        make_atlas_phantom(seed, atlas_phantom.load_sources(str(atlas_dir))[0], (8.0,) * 3, info=base)
        make_atlas_phantom(seed, atlas_phantom.load_sources(str(atlas_dir))[0], (8.0,) * 3,
                           prob={"excretory": 1.0}, info=info)
        assert info["phase"] == "excretory" and info["on"] == base["on"]


def test_stream_trains_on_fresh_phantoms_each_epoch(atlas_dir, tmp_path):
    args = ["--stream", "2", "--phantom", "atlas", "--atlas", str(atlas_dir), "--epochs", "2", "--spacing", "8",
            "--patch", "16", "--steps-per-epoch", "2", "--device", "cpu", "--out", str(tmp_path), "--run", "s"]
    summary = train.main(train.parse_args(args))
    best = torch.load(tmp_path / "s" / "best.pt", weights_only=True)
    assert summary["epochs_run"] == 2 and best["train_config"]["phantom"] == "atlas"
    stream = train.PhantomStream.__new__(train.PhantomStream)
    stream.cfg = train.TrainConfig(stream=3, seed=0)
    assert len(set(stream.seeds(0)) | set(stream.seeds(1))) == 6  # epochs never repeat a phantom


def test_colon_lies_under_the_liver_and_never_over_organs(atlas_dir, monkeypatch):
    atlases = [load_atlas(str(p)) for p in atlas_paths(atlas_dir)]
    seen = {}
    paint = atlas_phantom._paint_colon

    def spy(c, rng, organs, *args):
        before = c.hu.copy()
        paint(c, rng, organs, *args)
        seen.update(changed=before != c.hu, organs=organs.copy(), z=c.z)

    monkeypatch.setattr(atlas_phantom, "_paint_colon", spy)
    for seed in range(10):
        make_atlas_phantom(seed, atlases, (4.0, 4.0, 4.0))
        if seen and seen["changed"].sum() > 100:
            break
    changed, organs, z = seen["changed"], seen["organs"], seen["z"]
    assert changed.sum() > 100 and not (changed & (organs > 0)).any()
    liver = np.argwhere(organs == 1)
    colon = np.argwhere(changed)
    liver_side = np.sign(liver[:, 0].mean() - organs.shape[0] / 2) * (colon[:, 0] - organs.shape[0] / 2) > 0
    assert (liver_side & (z[colon[:, 2]] < np.quantile(z[liver[:, 2]], 0.1))).any()


@needs_real
def test_flare22_maps_load_with_plausible_anatomy():
    atlases = [load_atlas(str(p)) for p in atlas_paths(REAL / "flare22_labels")[:2]]
    for a in atlases:
        vox = 2.0 ** 3 / 1000  # mL per atlas voxel
        assert 900 < (a.label == 1).sum() * vox < 3000  # liver
        assert 60 < (a.label == 3).sum() * vox < 600  # spleen
        assert a.z_right_kidney < a.liver_top
    found = [set(np.unique(make_atlas_phantom(seed, atlases, (3.0, 3.0, 3.0))[1]).tolist()) for seed in (0, 1)]
    assert all(f <= {0, 1, 2, 3, 4} for f in found) and {0, 1, 2, 3, 4} in found  # a narrow view may miss an organ


def test_atlas_stream_without_atlas_is_one_clear_error(tmp_path):
    args = ["--stream", "2", "--phantom", "mixed", "--device", "cpu", "--out", str(tmp_path), "--run", "x"]
    with pytest.raises(UserError, match="--phantom mixed needs --atlas FOLDER"):
        train.main(train.parse_args(args))
    assert not (tmp_path / "x").exists()


def _with_and_without(atlases, name: str, seed: int, spacing: float, phase: str) -> tuple[np.ndarray, dict, dict]:
    """The same phantom with the phenomenon `name` off (its default) and forced on: the label map (the same for
    both), and each one's info."""
    assert atlas_phantom.PROBABILITIES[name] == 0.0
    plain, forced = {}, {}
    _, label, _ = make_atlas_phantom(seed, atlases, (spacing,) * 3, phase=phase, info=plain)
    _, label_forced, _ = make_atlas_phantom(seed, atlases, (spacing,) * 3, phase=phase, prob={name: 1.0}, info=forced)
    assert np.array_equal(label, label_forced) and forced["on"][name] and not plain["on"][name]
    return label, plain, forced


def test_split_bolus_excretory_phantom_enhances_as_nephrographic_and_changes_nothing_else(atlas_dir):
    """split_bolus (off by default) makes an excretory phantom's kidneys, vessels, liver and spleen enhance as in
    the nephrographic phase, urine still excreted; the organs, their labels and every other phantom stay the same."""
    atlases = atlas_phantom.load_sources(str(atlas_dir))[0]
    for seed in range(2):
        label, _, split = _with_and_without(atlases, "split_bolus", seed, 8.0, "excretory")
        kidney = ((label == 2) | (label == 3)) & ~split["collecting"]
        assert 135 <= np.median(split["painted"][kidney]) <= 265  # nephrographic cortex and medulla, +-15 HU
        assert np.median(split["painted"][split["collecting"]]) >= 300  # excreted contrast
        hu, _, _ = make_atlas_phantom(seed, atlases, (8.0,) * 3, phase="portal")
        hu_split, _, _ = make_atlas_phantom(seed, atlases, (8.0,) * 3, phase="portal", prob={"split_bolus": 1.0})
        assert np.array_equal(hu, hu_split)  # only an excretory phantom changes


def test_open_hilum_opens_the_collecting_system_to_the_kidney_surface_and_changes_nothing_else(atlas_dir):
    """open_hilum (off by default) carries the sinus and the pelvis through to the kidney's surface toward the
    spine, keeping the kidney's label; a closed sinus stays at least 5 mm inside it; labels and other draws stay."""
    from scipy import ndimage

    atlases = atlas_phantom.load_sources(str(atlas_dir))[0]
    reached = 0
    for seed in range(2):
        label, closed, opened = _with_and_without(atlases, "open_hilum", seed, 3.0, "excretory")
        assert (opened["collecting"] | ~closed["collecting"]).all()  # the closed system is kept, and grown
        for value in (2, 3):
            kidney = label == value
            if not (closed["collecting"] & kidney).any():
                continue
            depth = ndimage.distance_transform_edt(np.pad(kidney, 1), sampling=3.0)[1:-1, 1:-1, 1:-1]
            assert depth[closed["collecting"] & kidney].min() >= 5.0
            reached += depth[opened["collecting"] & kidney].min() <= 3.0  # the outermost voxel: the hilum
            assert (label[opened["collecting"]] > 0).all()  # kidney, as the rest of the collecting system
        hu_portal, _, _ = make_atlas_phantom(seed, atlases, (4.0,) * 3, phase="portal")
        hu_portal_plain, _, _ = make_atlas_phantom(seed, atlases, (4.0,) * 3, phase="portal", prob={"open_hilum": 0.0})
        assert np.array_equal(hu_portal, hu_portal_plain)
    assert reached >= 2


def test_thin_perirenal_thins_the_kidneys_fat_capsule_and_changes_nothing_else(atlas_dir):
    """thin_perirenal (off by default) paints the perirenal fat 0-3 mm thick instead of 3-12; labels and every other
    draw stay the same."""
    from scipy import ndimage

    atlases = atlas_phantom.load_sources(str(atlas_dir))[0]
    label, plain, lean = _with_and_without(atlases, "thin_perirenal", 0, 2.0, "portal")
    away = ndimage.distance_transform_edt((label != 2) & (label != 3), sampling=2.0)
    assert (away[plain["perirenal"]] < 12.0).all() and (away[lean["perirenal"]] < 3.0).all()
    assert lean["perirenal"].sum() < plain["perirenal"].sum()
    hu, _, _ = make_atlas_phantom(1, atlases, (4.0,) * 3, phase="native")
    hu_plain, _, _ = make_atlas_phantom(1, atlases, (4.0,) * 3, phase="native", prob={"thin_perirenal": 0.0})
    assert np.array_equal(hu, hu_plain)


def test_second_mass_adds_a_mass_labelled_background_and_changes_nothing_else(atlas_dir):
    """second_mass (off by default) draws a second extra-organ mass from a stream of its own: more mass, labelled
    background, the organs beside it keep at least half their voxels (as for the first); a phantom without it is
    the same as before it existed."""
    from scipy import ndimage

    atlases = atlas_phantom.load_sources(str(atlas_dir))[0]
    assert atlas_phantom.PROBABILITIES["second_mass"] == 0.0
    more = 0
    for seed in range(3):
        one, two = {}, {}
        _, label1, _ = make_atlas_phantom(seed, atlases, (4.0,) * 3, phase="portal", prob={"mass": 1.0}, info=one)
        _, label2, _ = make_atlas_phantom(seed, atlases, (4.0,) * 3, phase="portal",
                                          prob={"mass": 1.0, "second_mass": 1.0}, info=two)
        assert two["on"]["second_mass"] and not one["on"]["second_mass"]
        assert two["mass"].any() and not label2[two["mass"]].any()
        assert all((label2 == v).sum() >= 0.5 * (label1 == v).sum() for v in (1, 2, 3, 4))
        more += ndimage.label(two["mass"])[1] > ndimage.label(one["mass"])[1] or two["mass"].sum() > one["mass"].sum()
    assert more >= 2
    hu, _, _ = make_atlas_phantom(1, atlases, (4.0,) * 3, phase="native")
    hu_plain, _, _ = make_atlas_phantom(1, atlases, (4.0,) * 3, phase="native", prob={"second_mass": 0.0})
    assert np.array_equal(hu, hu_plain)
