"""Regenerate ctgen's built-in tiny text encoder (ctgen/assets/text/builtin_t5/), deterministically.

    python -m ctgen.text.make_builtin [--out DIR]      # default: the package's assets dir

What it makes (a Hugging Face-format T5 v1.1 encoder directory, so `transformers` can load it too):
  spiece.model      sentencepiece unigram model (448 pieces, T5 ids: pad 0, EOS 1, unk 2, no BOS)
                    trained single-threaded on a synthetic corpus of chest CT report sentences and
                    GenerateCT-style prompts written by `corpus()` below (seeded, no external data)
  model.safetensors T5 v1.1 encoder, preset "tiny" (d_model 64, 2 layers, 4 heads x 16, d_ff 128,
                    640-row embedding = 448 pieces + 100 sentinel ids, rounded up to 128), float32,
                    *randomly initialised* with T5X's initialiser scales from numpy's PCG64 (seed 0)
  config.json       the matching transformers `T5Config` (gated-gelu)

It is a plumbing model for the demo and tests: it is not trained, knows nothing about language
or medicine, and its embeddings only separate prompts by their tokens. Real use needs real T5
weights (docs/text.md). The corpus could later come from `ctgen.data.phantom_report`; it is
written here so the shipped files do not change when the phantom generator does.
"""
from __future__ import annotations

import argparse
import io
import json
import os
from typing import Iterator

import numpy as np

from ctgen.text.config import T5Config
from ctgen.text.prompt import build_prompt

SEED = 0
NUM_PIECES = 448
NUM_SENTENCES = 4000

_LOBES = ["right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe",
          "lingula", "both lower lobes", "both upper lobes", "bilateral lungs", "apical segments",
          "posterior basal segments", "superior segment of the right lower lobe", "anterior segment"]
_FINDINGS = [
    "solid nodule measuring {mm} mm", "part-solid nodule of {mm} mm", "ground-glass opacity of {mm} mm",
    "patchy consolidation", "subsegmental atelectasis", "linear atelectasis", "centrilobular emphysema",
    "paraseptal emphysema", "bullous changes", "interlobular septal thickening", "bronchiectasis",
    "peribronchial thickening", "calcified granuloma", "fibrotic bands", "honeycombing",
    "mosaic attenuation", "tree-in-bud opacities", "cavitary lesion of {mm} mm", "mass of {cm} cm",
    "pleural thickening", "pleural-based nodule", "mucus plugging", "air trapping", "reticular opacities",
    "traction bronchiectasis", "crazy-paving pattern", "halo sign", "bronchial wall thickening",
    "pulmonary infarct", "lymphangitic spread", "miliary nodules", "pneumatocele", "hamartoma with fat",
]
_NEGATIVES = [
    "No pleural effusion or pneumothorax.", "No pathologically enlarged lymph nodes in the mediastinum.",
    "Heart size is within normal limits.", "No pericardial effusion.", "Trachea and main bronchi are patent.",
    "No focal consolidation.", "No suspicious pulmonary nodule.", "Thoracic aorta is of normal caliber.",
    "The visualized upper abdominal organs are unremarkable.", "No lytic or sclerotic bone lesion.",
    "Mediastinal structures are within normal limits.", "No evidence of pulmonary embolism on this study.",
]
_OTHER = [
    "Cardiomegaly with a cardiothoracic ratio of 0.{ratio}.", "{side} pleural effusion of {size} size.",
    "Bilateral pleural effusions, {size} on the right and {size2} on the left.",
    "Calcified atherosclerotic plaques in the aorta and coronary arteries.",
    "Mediastinal lymph node measuring {mm} mm in short axis.", "Hiatal hernia.",
    "Degenerative changes of the thoracic spine.", "Thyroid gland is enlarged with a {mm} mm nodule.",
    "Ascending aorta measures {cm} cm in diameter.", "Status post sternotomy.", "Compression fracture of T{vert}.",
    "Hepatic steatosis.", "A {mm} mm cyst in the left kidney.", "Gallstones are noted.",
]
_IMPRESSIONS = [
    "Findings compatible with COVID-19 pneumonia.", "Emphysema.", "Pulmonary nodule, follow-up recommended.",
    "Cardiomegaly.", "Pleural effusion.", "No acute cardiopulmonary abnormality.", "Atelectasis.",
    "Consolidation suggestive of pneumonia.", "Bronchiectasis.", "Interstitial lung disease pattern.",
    "Lung mass, malignancy cannot be excluded.", "Coronary artery calcification.", "Normal chest CT.",
]
_CLINICAL = [
    "Cough and fever for {n} days.", "Shortness of breath.", "History of smoking, {n} pack years.",
    "Follow-up of a known pulmonary nodule.", "Chest pain and dyspnea.", "Staging of known breast carcinoma.",
    "Suspected pulmonary embolism.", "Weight loss and hemoptysis.", "Preoperative evaluation.",
    "Chronic obstructive pulmonary disease exacerbation.", "Trauma, rule out rib fractures.",
]
_TECHNIQUE = [
    "Non-contrast chest CT was acquired with {slice} mm slice thickness.",
    "Contrast-enhanced axial images were obtained from the thoracic inlet to the adrenal glands.",
    "Multiplanar reformatted images in sagittal and coronal planes were reviewed.",
    "Images were reconstructed in lung and mediastinal windows.",
]
_FOLLOWUP = [
    "Follow-up CT in {n} months is recommended.", "Compared with the prior examination, the nodule is stable.",
    "Interval decrease in the size of the effusion.", "Interval progression of the consolidation.",
    "Clinical and laboratory correlation is advised.", "Further evaluation with PET-CT may be considered.",
    "Bronchoscopy could be helpful for tissue diagnosis.", "New since the previous study.",
]
_ADJ = ["mild", "moderate", "severe", "minimal", "marked", "small", "large", "diffuse", "focal", "scattered",
        "extensive", "subtle", "faint", "dense", "nodular", "irregular", "spiculated", "lobulated", "peripheral",
        "central", "subpleural", "perihilar", "bilateral", "multifocal", "chronic", "acute", "residual"]
_VERB = ["is seen in", "is noted in", "is present in", "is observed in", "involves", "is identified in"]


def corpus(seed: int = SEED, n: int = NUM_SENTENCES) -> Iterator[str]:
    """Deterministic synthetic chest CT report sentences and GenerateCT-style prompts."""
    rng = np.random.Generator(np.random.PCG64(seed))
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731

    def fill(s: str) -> str:
        return s.format(mm=int(rng.integers(3, 40)), cm=f"{rng.uniform(1, 8):.1f}", ratio=int(rng.integers(50, 75)),
                        side=pick(["Right", "Left"]), n=int(rng.integers(2, 40)),
                        slice=pick(["1", "1.25", "1.5", "2", "5"]), size=pick(["small", "moderate", "large"]),
                        size2=pick(["small", "moderate", "large"]), vert=int(rng.integers(1, 13)))

    for i in range(n):
        kind = i % 5
        if kind == 4:
            yield fill(" ".join([pick(_CLINICAL), pick(_TECHNIQUE), pick(_FOLLOWUP)]))
        elif kind == 0:
            yield fill(f"{pick(_ADJ).capitalize()} {pick(_FINDINGS)} {pick(_VERB)} the {pick(_LOBES)}.")
        elif kind == 1:
            yield fill(" ".join(pick(_NEGATIVES + _OTHER) for _ in range(int(rng.integers(1, 4)))))
        elif kind == 2:
            impression = " ".join(pick(_IMPRESSIONS) for _ in range(int(rng.integers(1, 3))))
            yield build_prompt(age=f"{int(rng.integers(18, 95)):03d}Y", sex=pick(["M", "F"]), impression=impression)
        else:
            findings = fill(f"{pick(_FINDINGS).capitalize()} in the {pick(_LOBES)}. {pick(_NEGATIVES)}")
            yield build_prompt(age=int(rng.integers(18, 95)), sex=pick(["M", "F"]), findings=findings,
                               impression=pick(_IMPRESSIONS), template="{age} years old {sex}: {findings} {impression}")


def train_sentencepiece(sentences: list[str], num_pieces: int = NUM_PIECES) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=num_pieces, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, seed_sentencepiece_size=100000,
        normalization_rule_name="nmt_nfkc", minloglevel=2,
    )
    return buf.getvalue()


def init_params(cfg: T5Config, seed: int = SEED) -> dict[str, np.ndarray]:
    """T5X-style random init (fan-in normal; query scaled by 1/sqrt(d_kv)) from numpy, in ctgen paths."""
    rng = np.random.Generator(np.random.PCG64(seed))
    normal = lambda shape, std: (rng.standard_normal(shape) * std).astype(np.float32)  # noqa: E731
    d, inner, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    params = {"token_embedder/embedding": normal((cfg.vocab_size, d), 1.0)}
    limit = np.sqrt(3.0 / ((cfg.num_heads + cfg.relative_attention_num_buckets) / 2))
    params["encoder/relpos_bias/rel_embedding"] = rng.uniform(
        -limit, limit, (cfg.num_heads, cfg.relative_attention_num_buckets)).astype(np.float32)
    for i in range(cfg.num_layers):
        p = f"encoder/layers_{i}/"
        params[p + "pre_attention_layer_norm/scale"] = np.ones((d,), np.float32)
        params[p + "attention/query/kernel"] = normal((d, inner), d ** -0.5 * cfg.d_kv ** -0.5)
        params[p + "attention/key/kernel"] = normal((d, inner), d ** -0.5)
        params[p + "attention/value/kernel"] = normal((d, inner), d ** -0.5)
        params[p + "attention/out/kernel"] = normal((inner, d), inner ** -0.5)
        params[p + "pre_mlp_layer_norm/scale"] = np.ones((d,), np.float32)
        params[p + "mlp/wi_0/kernel"] = normal((d, f), d ** -0.5)
        params[p + "mlp/wi_1/kernel"] = normal((d, f), d ** -0.5)
        params[p + "mlp/wo/kernel"] = normal((f, d), f ** -0.5)
    params["encoder/encoder_norm/scale"] = np.ones((d,), np.float32)
    return params


def make_builtin(out_dir: str) -> list[str]:
    """Write spiece.model, model.safetensors, config.json into `out_dir`; returns the paths."""
    from safetensors.numpy import save_file

    from ctgen.convert.t5 import ours_to_hf

    cfg = T5Config.preset("tiny")
    sp_model = train_sentencepiece(list(corpus()))
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_proto=sp_model).get_piece_size()
    if pieces + 100 > cfg.vocab_size:
        raise RuntimeError(f"{pieces} pieces + 100 sentinels exceed the tiny embedding ({cfg.vocab_size} rows)")
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("spiece.model", "model.safetensors", "config.json")]
    with open(paths[0], "wb") as f:
        f.write(sp_model)
    hf = ours_to_hf(init_params(cfg))
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(hf.items())}, paths[1], metadata={"format": "pt"})
    with open(paths[2], "w", encoding="utf-8") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
    for p in paths:  # safetensors writes 0600; package data must be world-readable
        os.chmod(p, 0o644)
    return paths


def main(argv: list[str] | None = None) -> None:
    from ctgen.text.load import builtin_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=builtin_dir(), help="output directory (default: the package assets)")
    args = parser.parse_args(argv)
    for p in make_builtin(args.out):
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")


if __name__ == "__main__":
    main()
