"""Does a text encoder tell phantom prompts apart? A linear probe on its embeddings.

The demo cascade conditions its MaskGIT and SR on the built-in T5, whose weights are random
(`ctgen/assets/text/builtin_t5/README.md`): it encodes no meaning, but it is a fixed, injective-looking
map from token sequences to vectors, and its sentencepiece vocabulary was trained on report-style
text, so finding words are pieces of their own. Whether that is enough is measured here: phantom
prompts (`ctgen.data.phantom_report`, the `paper` template, as `ctgen prepare --source phantom`
writes them) are encoded, their embeddings mean-pooled over the valid tokens, and a ridge
one-vs-rest classifier fitted on a training set predicts each scored attribute of held-out
prompts (`ctgen.eval.adherence.parse_prompt` gives the labels). Mean pooling throws away word
order, so this is a lower bound on what a model that cross-attends to every token can read.

    python -m ctgen.eval.text_probe [--encoder builtin] [--train 1500] [--test 500] [--seed 0]

prints, per attribute, the probe's held-out accuracy next to always guessing the commonest class.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from ctgen.eval.adherence import parse_prompt

ATTRIBUTES = ("cardiomegaly", "effusion", "nodules", "emphysema")


def phantom_prompts(n: int, seed: int = 0, p_normal: float = 0.3) -> list[str]:
    """n prompts of phantom studies (attributes and report drawn as the phantom source does)."""
    from ctgen.data.phantom_report import sample_attributes, write_report
    from ctgen.text.prompt import build_prompt

    rng = np.random.default_rng([seed, 7919])
    out = []
    for _ in range(n):
        a = sample_attributes(rng, p_normal=p_normal)
        r = write_report(a, rng)
        out.append(build_prompt(age=a["age"], sex=a["sex"], impression=r["impression"], findings=r["findings"]))
    return out


def labels(prompts: Sequence[str]) -> dict[str, np.ndarray]:
    parsed = [parse_prompt(p) for p in prompts]
    return {k: np.asarray([str(p[k]) for p in parsed]) for k in ATTRIBUTES}


def pooled_embeddings(prompts: Sequence[str], encoder: str = "builtin", max_length: int = 128) -> tuple[np.ndarray, int]:
    """(mean-pooled embeddings N x E, longest prompt in tokens before truncation)."""
    from ctgen.text.encode import encode_text
    from ctgen.text.load import load_text_encoder

    model, tok, _ = load_text_encoder(encoder)
    longest = int(max(len(tok.encode(p)) for p in prompts)) + 1  # + EOS
    emb, mask = encode_text(model, tok, list(prompts), max_length=max_length, batch_size=256)
    emb, mask = np.asarray(emb, np.float64), np.asarray(mask, np.float64)
    return (emb * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1), longest


def ridge_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """One-vs-rest ridge regression on standardised features; predicted class per test row."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    a, b = np.hstack([a, np.ones((len(a), 1))]), np.hstack([b, np.ones((len(b), 1))])
    classes = np.unique(y_train)
    targets = (y_train[:, None] == classes[None]).astype(np.float64)
    w = np.linalg.solve(a.T @ a + l2 * len(a) * np.eye(a.shape[1]), a.T @ targets)
    return classes[np.argmax(b @ w, axis=1)]


def probe(encoder: str = "builtin", n_train: int = 1500, n_test: int = 500, seed: int = 0,
          max_length: int = 128) -> dict:
    """{"attributes": {name: {"accuracy", "majority", "classes"}}, "longest_prompt_tokens", ...}."""
    prompts = phantom_prompts(n_train + n_test, seed)
    x, longest = pooled_embeddings(prompts, encoder, max_length)
    ys = labels(prompts)
    out = {}
    for name, y in ys.items():
        y_tr, y_te = y[:n_train], y[n_train:]
        pred = ridge_probe(x[:n_train], y_tr, x[n_train:])
        values, counts = np.unique(y_tr, return_counts=True)
        majority = values[np.argmax(counts)]
        out[name] = {"accuracy": float(np.mean(pred == y_te)), "majority": float(np.mean(y_te == majority)),
                     "classes": {str(v): int(c) for v, c in zip(*np.unique(y_te, return_counts=True))}}
    return {"encoder": encoder, "train": n_train, "test": n_test, "seed": seed, "max_length": max_length,
            "longest_prompt_tokens": longest, "attributes": out}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctgen.eval.text_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="builtin", help="'builtin' or a T5 directory")
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args(argv)
    r = probe(args.encoder, args.train, args.test, args.seed, args.max_length)
    print(f"encoder {r['encoder']}: {r['train']} training / {r['test']} held-out phantom prompts, longest "
          f"{r['longest_prompt_tokens']} tokens (max_length {r['max_length']})")
    print("| attribute | probe accuracy | commonest class | held-out classes |\n|---|---|---|---|")
    for name, a in r["attributes"].items():
        print(f"| {name} | {a['accuracy']:.3f} | {a['majority']:.3f} | "
              f"{', '.join(f'{k} {v}' for k, v in a['classes'].items())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
