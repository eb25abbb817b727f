"""Procedural chest radiographs: contract (shape, dtype, determinism, errors), anatomy-respecting severity
effects, and that findings are learnable from coarse pixels while the seed alone is not."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from carebench.data.synthetic.radiograph import (
    FINDINGS,
    PATIENT_KEYS,
    RadiographArgumentError,
    render_radiograph,
)
from carebench.errors import UserError

MAIN_FINDINGS = (
    "cardiomegaly",
    "consolidation_left",
    "consolidation_right",
    "effusion_left",
    "effusion_right",
    "edema",
)


def render(
    seed: int, findings: dict[str, float] | None = None, size: int = 128, view: str = "PA"
) -> np.ndarray:
    return render_radiograph(np.random.default_rng(seed), findings or {}, size, view)


# ------------------------------------------------------------------------------------------------ contract


def test_finding_keys_are_the_agreed_ones():
    assert FINDINGS == (
        "cardiomegaly",
        "consolidation_left",
        "consolidation_right",
        "effusion_left",
        "effusion_right",
        "edema",
        "atelectasis",
        "pneumothorax",
        "ett",
        "central_line",
        "pacemaker",
    )
    assert PATIENT_KEYS == ("body_size", "exposure")


@pytest.mark.parametrize("view", ["AP", "PA", "LATERAL"])
@pytest.mark.parametrize("size", [32, 64, 100, 256, 300, 512])
def test_shape_dtype_and_range(view, size):
    img = render(3, {"edema": 0.5, "ett": 1.0, "pacemaker": 1.0}, size, view)
    assert img.shape == (size, size)
    assert img.dtype == np.uint8
    # A radiograph uses the grey scale: air outside the body is dark, bone/metal bright.
    assert img.min() < 60 and img.max() > 200


def test_same_seed_same_image_other_seed_other_image():
    f = {"consolidation_left": 0.6, "central_line": 1.0}
    a, b, c = render(11, f, 256, "AP"), render(11, f, 256, "AP"), render(12, f, 256, "AP")
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.5


def test_consumes_exactly_one_draw_from_the_callers_generator():
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    render_radiograph(rng, {"pneumothorax": 1.0}, 64, "PA")
    ref.integers(0, 2**63 - 1, dtype=np.int64)
    assert rng.integers(0, 2**62) == ref.integers(0, 2**62)


def test_patient_keys_default_to_one_half():
    np.testing.assert_array_equal(render(8), render(8, {"body_size": 0.5, "exposure": 0.5}))


def test_absent_finding_equals_zero_severity_and_devices_leave_the_lungs_alone():
    base = render(21, {}, 128, "PA")
    np.testing.assert_array_equal(base, render(21, dict.fromkeys(FINDINGS, 0.0), 128, "PA"))
    # Same seed = same patient: an endotracheal tube changes only the central column of the neck/upper chest.
    tube = render(21, {"ett": 1.0}, 128, "PA")
    changed = np.argwhere(tube != base)
    assert len(changed) > 0
    assert changed[:, 0].max() < 0.5 * 128  # above the carina
    assert np.abs(changed[:, 1] - 64).max() < 0.15 * 128  # in the midline


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"findings": {"cardiomegally": 0.5}}, "findings"),
        ({"findings": {"edema": 1.5}}, "findings['edema']"),
        ({"findings": {"edema": float("nan")}}, "findings['edema']"),
        ({"findings": {"edema": "severe"}}, "findings['edema']"),
        ({"findings": [("edema", 0.5)]}, "findings"),
        ({"view": "AP_SUPINE"}, "view"),
        ({"view": "ap"}, "view"),
        ({"size": 31}, "size"),
        ({"size": 64.0}, "size"),
        ({"rng": 0}, "rng"),
    ],
)
def test_bad_arguments_raise_a_one_line_error_naming_the_argument(kwargs, argument):
    args = {"rng": np.random.default_rng(0), "findings": {}, "size": 64, "view": "PA"} | kwargs
    with pytest.raises(RadiographArgumentError) as info:
        render_radiograph(**args)
    message = str(info.value)
    assert message.startswith(f"{argument}:")
    assert "\n" not in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)


# ------------------------------------------------------------------------------ severity follows anatomy


def heart_width(img: np.ndarray) -> float:
    """Width (fraction of the image) of the bright central shadow at the level of the heart: from the centre
    outwards until the row profile falls halfway to the darkest lung on that side."""
    n = img.shape[0]
    prof = img[int(0.55 * n) : int(0.63 * n)].astype(float).mean(axis=0)
    c = n // 2
    thr_left = 0.5 * (prof[c] + prof[int(0.1 * n) : c].min())
    thr_right = 0.5 * (prof[c] + prof[c : int(0.9 * n)].min())
    i = c
    while i > 0 and prof[i - 1] > thr_left:
        i -= 1
    j = c
    while j < n - 1 and prof[j + 1] > thr_right:
        j += 1
    return (j - i + 1) / n


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cardiomegaly_widens_the_heart_shadow(seed):
    widths = [heart_width(render(seed, {"cardiomegaly": s}, 128, "PA")) for s in (0.0, 0.33, 0.66, 1.0)]
    assert all(b > a for a, b in itertools.pairwise(widths)), widths
    assert widths[-1] >= 1.2 * widths[0], widths


def test_ap_films_magnify_the_heart():
    ap = np.mean([heart_width(render(s, {}, 128, "AP")) for s in range(12)])
    pa = np.mean([heart_width(render(s, {}, 128, "PA")) for s in range(12)])
    assert ap > 1.08 * pa


def lower_lateral(img: np.ndarray, side: str) -> np.ndarray:
    """Lower lateral zones of the patient's ``side`` hemithorax (patient's left = image right)."""
    n = img.shape[0]
    rows = slice(int(0.4 * n), int(0.78 * n))
    cols = slice(int(0.68 * n), int(0.88 * n)) if side == "left" else slice(int(0.12 * n), int(0.32 * n))
    return img[rows, cols].astype(float)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("view", ["PA", "AP"])
def test_effusion_whitens_the_lower_lateral_zone_of_its_side_only(side, view):
    other = "right" if side == "left" else "left"
    imgs = [render(4, {f"effusion_{side}": s}, 128, view) for s in (0.0, 0.33, 0.66, 1.0)]
    own = [lower_lateral(im, side).mean() for im in imgs]
    assert all(b > a + 2 for a, b in itertools.pairwise(own)), own
    for im in imgs[1:]:
        assert np.abs(lower_lateral(im, other) - lower_lateral(imgs[0], other)).mean() < 0.5


@pytest.mark.parametrize("side", ["left", "right"])
def test_consolidation_is_a_lower_zone_opacity_of_its_side(side):
    other = "right" if side == "left" else "left"
    base = render(9, {}, 128, "PA").astype(float)
    gain = {}
    for s in (0.33, 0.66, 1.0):
        diff = render(9, {f"consolidation_{side}": s}, 128, "PA").astype(float) - base
        half = {"left": diff[:, 64:], "right": diff[:, :64]}
        gain[s] = half[side][64:].mean()  # lower half of its hemithorax
        assert half[side][64:].mean() > 2 * half[side][:40].mean()  # lower zone, not the apex
        assert np.abs(half[other]).mean() < 0.3
    assert gain[0.33] < gain[0.66] < gain[1.0]


def test_edema_is_a_bilateral_perihilar_haze():
    base = render(5, {}, 128, "PA").astype(float)
    prev = 0.0
    for s in (0.33, 0.66, 1.0):
        diff = render(5, {"edema": s}, 128, "PA").astype(float) - base
        left, right = diff[40:90, 70:105].mean(), diff[40:90, 23:58].mean()
        assert min(left, right) > 3 and min(left, right) > prev
        assert max(left, right) < 2.5 * min(left, right)  # both sides
        assert diff[40:90, 23:105].mean() > 3 * diff[40:90, :10].mean()  # central, not at the chest wall
        prev = min(left, right)


def test_pneumothorax_darkens_the_apex_and_draws_a_pleural_line():
    base = render(2, {}, 256, "PA").astype(float)
    ptx = render(2, {"pneumothorax": 0.8}, 256, "PA").astype(float)
    diff = ptx - base
    # The collapsed side: dark rim at the apex/lateral wall (free air) ...
    apex = {"right": diff[40:90, 30:110], "left": diff[40:90, 146:226]}
    darker = min(apex, key=lambda k: apex[k].mean())
    assert apex[darker].mean() < -8
    # ... bounded by a thin bright line, the visceral pleura, inside that hemithorax.
    half = diff[:, :128] if darker == "right" else diff[:, 128:]
    assert half.max() > 25


def test_more_exposure_gives_a_darker_film():
    means = [render(6, {"exposure": e}, 64, "PA").mean() for e in (0.0, 0.5, 1.0)]
    assert means[0] > means[1] + 5 > means[2] + 10


def test_pacemaker_is_a_bright_box_below_the_left_clavicle():
    base = render(13, {}, 128, "PA").astype(float)
    diff = render(13, {"pacemaker": 1.0}, 128, "PA").astype(float) - base
    upper_left = diff[10:64, 64:]  # patient's left upper chest = image upper right
    assert upper_left.max() > 60
    assert (diff > 40).sum() > 40  # a box, not a wire
    assert diff[:, :40].max() < 40  # nothing in the right lateral chest


# --------------------------------------------------------------------- learnable findings, unlearnable seed


def _features(img: np.ndarray) -> np.ndarray:
    return img.reshape(32, 2, 32, 2).mean(axis=(1, 3)).ravel() / 255.0


def _nuisance(g: np.random.Generator) -> tuple[dict[str, float], str]:
    """Random patient, acquisition and distracting devices."""
    f = {"body_size": float(g.uniform()), "exposure": float(g.uniform(0.2, 0.8))}
    for device in ("ett", "central_line", "pacemaker"):
        if g.uniform() < 0.2:
            f[device] = 1.0
    return f, ("AP" if g.uniform() < 0.6 else "PA")


def _heldout_auroc(x: np.ndarray, y: np.ndarray) -> float:
    """Mean held-out AUROC of logistic regression over five stratified 60/40 splits."""
    scores = []
    for split in range(5):
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.4, stratify=y, random_state=split)
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
        clf.fit(x_tr, y_tr)
        scores.append(roc_auc_score(y_te, clf.decision_function(x_te)))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def finding_free() -> np.ndarray:
    rows = []
    for i in range(300):
        g = np.random.default_rng([1, i])
        f, view = _nuisance(g)
        rows.append(_features(render_radiograph(g, f, 64, view)))
    return np.array(rows)


@pytest.mark.parametrize("finding", MAIN_FINDINGS)
def test_each_main_finding_is_detectable_from_32px_pixels(finding, finding_free):
    """Logistic regression on 32x32 pixels separates moderate findings from none despite nuisance."""
    pos = []
    for i in range(150):
        g = np.random.default_rng([2, FINDINGS.index(finding), i])
        f, view = _nuisance(g)
        f[finding] = float(g.uniform(0.3, 0.7))
        pos.append(_features(render_radiograph(g, f, 64, view)))
    x = np.concatenate([finding_free[:150], np.array(pos)])
    y = np.r_[np.zeros(150), np.ones(150)]
    assert _heldout_auroc(x, y) > 0.8


def test_finding_free_images_are_not_distinguishable_by_seed(finding_free):
    """Images rendered from even and odd seeds carry no signal: a classifier trained on one set of renders
    scores chance on an independent set (independent, because splitting one finite sample of pure noise
    biases held-out AUROC below 0.5)."""
    test = []
    for i in range(300):
        g = np.random.default_rng([3, i])
        f, view = _nuisance(g)
        test.append(_features(render_radiograph(g, f, 64, view)))
    y = np.arange(300) % 2
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
    clf.fit(finding_free, y)
    assert abs(roc_auc_score(y, clf.decision_function(np.array(test))) - 0.5) < 0.1
