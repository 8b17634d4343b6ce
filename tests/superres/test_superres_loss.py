"""The SR loss's low-res noise augmentation: the level is drawn from [0, diffusion.lowres_aug_max]
(GenerateCT: the whole [0, 1]), and a level outside (0, 1] is refused with the key's name."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctgen.configuration import load
from ctgen.errors import UserError
from ctgen.sampling import diffusion as df
from ctgen.stages import get_stage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "superres.py")


def _stage(**over):
    over = {"data.dir": "unused", **over}
    return get_stage(load(f"{CONFIG}:tiny", [(k, str(v)) for k, v in over.items()]))


def _aug_levels(stage, seeds=range(40)):
    """The augmentation log-SNR the network is given, over one loss call per seed."""
    seen = []

    def spy(x_t, log_snr, low_noisy, aug_log_snr, text, mask, keep):
        seen.append(float(aug_log_snr[0]))
        assert np.all(np.asarray(aug_log_snr) == float(aug_log_snr[0]))  # one level per batch
        return jnp.zeros_like(x_t)

    rng = np.random.default_rng(0)
    batch = {"hires": rng.uniform(size=(2, 32, 32)).astype(np.float32),
             "lowres": rng.uniform(size=(2, 8, 8)).astype(np.float32)}
    for s in seeds:
        stage.loss(spy, batch, jax.random.key(s))
    return np.array(seen)


def test_lowres_augmentation_level_is_bounded_by_lowres_aug_max():
    bound = float(df.linear_log_snr(0.2))  # log-SNR falls as the level rises
    capped = _aug_levels(_stage(**{"diffusion.lowres_aug_max": 0.2}))
    assert capped.min() >= bound - 1e-5, (capped.min(), bound)
    full = _aug_levels(_stage())  # GenerateCT's [0, 1]: most levels are above 0.2
    assert np.mean(full < bound) > 0.5, full


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_lowres_aug_max_outside_0_1_is_refused(bad):
    with pytest.raises(UserError, match="diffusion.lowres_aug_max"):
        _stage(**{"diffusion.lowres_aug_max": bad})


def test_phantom_preset_caps_the_augmentation():
    cfg = load(f"{CONFIG}:phantom", [])
    assert cfg.diffusion.lowres_aug_max == 0.2
    assert load(f"{CONFIG}:paper", []).diffusion.lowres_aug_max == 1.0
