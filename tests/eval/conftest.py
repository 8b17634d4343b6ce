"""Phantoms shared by the eval tests: a few studies with chosen findings on a demo-sized grid."""
import pytest

from ctgen.data.phantom import make_phantom
from ctgen.eval.phantom_measure import measure_volume

SHAPE = (33, 64, 64)
SPACING = (301.5 / 33, 350.0 / 64, 350.0 / 64)  # the demo's phantom spacing on this grid

# seed, findings (make_phantom overrides on a study without other findings): every scored finding,
# effusions on each side and on both, and a normal study
STUDIES = (
    (1, dict(cardiomegaly=True, cardiothoracic_ratio=0.64)),
    (2, dict(effusion={"right_ml": 600.0, "left_ml": 0.0})),
    (3, dict(effusion={"right_ml": 0.0, "left_ml": 400.0}, nodules=[{"lobe": "right lower lobe", "diameter_mm": 24.0}])),
    (4, dict(cardiomegaly=True, cardiothoracic_ratio=0.6, effusion={"right_ml": 900.0, "left_ml": 300.0})),
    (5, dict(emphysema={"severity": "severe", "bullae": 1})),
    (6, dict()),
)


def _make_study(seed, findings, shape=SHAPE, spacing=SPACING):
    return make_phantom(seed, shape, spacing, p_normal=1.0, **findings)


@pytest.fixture(scope="session")
def make_study():
    """`make_study(seed, findings, shape=SHAPE, spacing=SPACING)`: a phantom with only these findings."""
    return _make_study


@pytest.fixture(scope="session")
def studies():
    return STUDIES


@pytest.fixture(scope="session")
def measured_studies():
    """[(phantom, label-free measurement)] of STUDIES."""
    out = []
    for seed, findings in STUDIES:
        ph = _make_study(seed, findings)
        out.append((ph, measure_volume(ph.hu, ph.spacing)))
    return out
