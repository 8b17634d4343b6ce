"""The demo cascade's weights as committed in ctgen/assets/demo_cascade (docs/demo_cascade.md).

The cascade was trained and committed stage by stage; each stage is checked here on held-out
phantoms (seed 1; the demo trained on seed 0's) or fixed prompts: that the files are the packed,
bfloat16 ones and that they still do what their quality bar says, at a size CI can afford. The
last part runs the whole shipped cascade the way the README's first command does."""
import json
import os

import numpy as np

from ctgen.generate import demo_cascade

SHIPPED = demo_cascade.default_dir()


def _held_out_phantoms(n: int, shape=(17, 32, 32)):
    from ctgen.data.preprocess import GridConfig
    from ctgen.data.sources import PhantomSource

    src = PhantomSource(n, 1, GridConfig(shape=shape))
    records, _ = src.scan()
    return [src.load(r) for r in records]


def _packed_stage_config(stage: str) -> dict:
    """The committed stage's model config, after checking it is a packed bfloat16 weights directory:
    under 3 bytes per parameter on disk (about 1.6 measured, the checkpoint format compresses);
    float32 would take 4."""
    from ctgen.weights import weights_info

    path = os.path.join(SHIPPED, stage)
    info = weights_info(path)
    assert info is not None, f"{path}: no committed {stage} stage"
    assert info["model"] == stage and "packed_from" in info and info["parameters"] > 1_000_000
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    assert info["parameters"] <= size < 3 * info["parameters"]
    return info["model_config"]


def test_the_shipped_ctvit_is_packed_bfloat16():
    cfg = _packed_stage_config("ctvit")
    assert (cfg["image_size"], cfg["patch_size"], cfg["codebook_size"]) == (32, 4, 2048)


def test_the_shipped_ctvit_reconstructs_held_out_phantoms():
    """The bar is 28 dB PSNR over the 100 held-out phantoms of the training dataset (measured with
    `ctgen eval`, docs/demo_cascade.md); 6 other phantoms vary more (27.57 dB measured), so the test asks for 27 dB: a
    damaged or random file reconstructs at about 10 dB."""
    from ctgen.eval.image_metrics import psnr, ssim
    from ctgen.eval.phantom_validate import ctvit_transform
    from ctgen.volume import clip_hu, hu_to_model

    transform = ctvit_transform(os.path.join(SHIPPED, "ctvit"))
    x, y = [], []
    for ph in _held_out_phantoms(6):
        rec, spacing = transform(ph["volume_DxHxW"], np.asarray(ph["spacing"]), ph)
        assert rec.shape == ph["volume_DxHxW"].shape == (17, 32, 32)
        np.testing.assert_allclose(spacing, ph["spacing"])
        x.append(hu_to_model(clip_hu(ph["volume_DxHxW"].astype(np.float32))))
        y.append(hu_to_model(clip_hu(rec.astype(np.float32))))
    x, y = np.stack(x), np.stack(y)
    p, s = float(np.mean(psnr(y, x))), float(np.mean(ssim(y, x)))
    print(f"shipped CT-ViT on 6 held-out phantoms: PSNR {p:.2f} dB, SSIM {s:.3f}")
    assert p >= 27.0 and s >= 0.85


PROBE_PROMPTS = ("normal", "cardiomegaly", "right_effusion")  # from ctgen/assets/eval/phantom_prompts.json


def _probe_prompts(path) -> dict:
    """Writes the probe's entries of the fixed prompt set to `path`; returns name -> prompt."""
    with open(os.path.join(os.path.dirname(demo_cascade.__file__), "..", "assets", "eval",
                           "phantom_prompts.json")) as f:
        entries = [e for e in json.load(f) if e["name"] in PROBE_PROMPTS]
    path.write_text(json.dumps(entries))
    return {e["name"]: e["prompt"] for e in entries}


def _adherence_summary(out: str) -> dict:
    with open(os.path.join(out, "eval", "adherence.json")) as f:
        return json.load(f)["adherence"]["summary"]


# ----------------------------------------------------------------------------- the MaskGIT stage
def test_the_shipped_maskgit_is_packed_bfloat16():
    cfg = _packed_stage_config("maskgit")
    assert (cfg["num_tokens"], cfg["dim_context"], cfg["dim"]) == (2048, 64, 192)


def test_the_shipped_maskgit_follows_its_prompts(tmp_path):
    """The committed MaskGIT through the committed CT-ViT (`--no-sr`, the 17 x 32 x 32 volume the
    ids decode to), measured with `ctgen eval --generated`: a small version of docs/demo_cascade.md's
    8-seed `--no-sr` probe (CTR gap 0.159, right effusions 16/16, fluid without effusion 11/32).
    Loose for 2 seeds; a MaskGIT that ignores its prompt has a CTR gap of noise around 0 and no
    tie between the right-effusion prompt and fluid on the right."""
    from ctgen.cli import main

    prompts = tmp_path / "prompts.json"
    _probe_prompts(prompts)
    out = str(tmp_path / "out")
    # no --checkpoints: the shipped cascade with its packed settings (slices, text length, guidance, extent)
    assert main(["generate", "--prompts", str(prompts), "--num-samples", "2", "--seed", "0", "--out", out,
                 "--no-sr"]) == 0
    assert main(["eval", "--generated", out, "--out", os.path.join(out, "eval")]) == 0
    s = _adherence_summary(out)
    print("shipped MaskGIT --no-sr, 2 seeds:", {k: s[k] for k in sorted(s)})
    assert s["n_cardiomegaly"] == 2 and s["n_normal"] == 4
    assert s["ctr_gap"] is not None and s["ctr_gap"] >= 0.05
    assert s["n_right_effusion"] == 2 and s["right_effusion_detected_fraction"] >= 0.5


# ----------------------------------------------------------------------------- the SR stage
def test_the_shipped_superres_is_packed_bfloat16():
    cfg = _packed_stage_config("superres")
    assert (cfg["dim"], cfg["text_embed_dim"], cfg["residual"]) == (16, 64, True)


# ----------------------------------------------------------------------------- the whole shipped cascade
def test_the_shipped_cascade_is_complete_small_and_hashed():
    """All three stages with a manifest, under the issue's 25 MB, every file's sha256 recorded and
    matching; `ctgen generate` checks the same hashes before it samples (test_demo_cascade.py). Each
    stage being packed bfloat16 is checked by the per-stage tests above."""
    man = demo_cascade.read_manifest(SHIPPED)
    assert set(man["stages"]) == set(demo_cascade.STAGES)
    assert man["bytes"] <= 25 * 10 ** 6
    assert man["files"] == demo_cascade._files(SHIPPED)
    assert man["generate"]["slices"] == 17 and man["generate"]["superres.scale"] == 4
    assert man["stages"]["maskgit"]["layout"] == "canonical"


def _volume(path):
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj)


def test_the_shipped_cascade_follows_its_prompts_and_is_deterministic(tmp_path):
    """The README's first command at probe size: 3 fixed prompts x 2 seeds through the whole shipped
    cascade with no --checkpoints (docs/demo_cascade.md's "Prompt adherence" runs 7 x 8), measured
    with `ctgen eval --generated`; one test, so that CI's workers do not each generate the probe.

    Adherence: heart size and effusion side follow the prompt through the SR (8-seed numbers:
    CTR gap 0.228, right effusions 16/16). Loose for 2 seeds; a cascade that ignores its prompt has
    a CTR gap of noise around 0 and no tie between the right-effusion prompt and fluid on the right.
    The fluid it also finds without an effusion in the prompt (20/32 over 8 seeds, the issue's bar is
    20%) is printed, not asserted: that bar is not met yet.

    Determinism: the same command -> the same volume, bit for bit. The same prompt and seed made
    in another batch (1 sample instead of the probe's 6) -> the same volume to within 1 HU: the
    sampled ids do not change, the float rounding of a differently shaped batch may. Another seed
    -> another volume."""
    from ctgen.cli import main

    prompts = _probe_prompts(tmp_path / "prompts.json")
    out = str(tmp_path / "out")
    assert main(["generate", "--prompts", str(tmp_path / "prompts.json"), "--num-samples", "2", "--seed", "0",
                 "--out", out]) == 0
    assert main(["eval", "--generated", out, "--out", os.path.join(out, "eval")]) == 0
    s = _adherence_summary(out)
    print("shipped cascade, 2 seeds x", PROBE_PROMPTS, {k: s[k] for k in sorted(s)})
    assert s["n_cardiomegaly"] == 2 and s["n_normal"] == 4
    assert s["ctr_gap"] is not None and s["ctr_gap"] >= 0.05
    assert s["n_right_effusion"] == 2 and s["right_effusion_detected_fraction"] >= 0.5
    first = _volume(os.path.join(out, "cardiomegaly_s0.nii.gz"))
    assert sorted(first.shape) == [17, 128, 128] and first.dtype == np.int16
    assert first.min() < -800 and first.max() > 0  # air outside the body, soft tissue inside: a CT, in HU
    assert os.path.isfile(os.path.join(out, "previews", "cardiomegaly_s0.png"))
    with open(os.path.join(out, "provenance", "cardiomegaly_s0.json")) as f:
        assert demo_cascade.NAME in json.dumps(json.load(f))

    runs = []
    for k in range(2):
        again = str(tmp_path / f"again{k}")
        assert main(["generate", prompts["cardiomegaly"], "--name", "cardiomegaly", "--seed", "0", "--out", again]) == 0
        runs.append(_volume(os.path.join(again, "cardiomegaly.nii.gz")).astype(np.int32))  # one sample: no _sN
    np.testing.assert_array_equal(runs[1], runs[0])
    first = first.astype(np.int32)
    assert np.abs(runs[0] - first).max() <= 1
    other_seed = _volume(os.path.join(out, "cardiomegaly_s1.nii.gz")).astype(np.int32)
    assert np.abs(other_seed - first).mean() > 5
