"""The built-in (random) T5 separates phantom prompts: a linear probe reads their findings back."""
import numpy as np

from ctgen.eval.text_probe import phantom_prompts, probe, ridge_probe


def test_ridge_probe_learns_a_linear_rule_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 8))
    y = np.where(x[:, 0] + 0.5 * x[:, 3] > 0, "a", "b")
    assert np.mean(ridge_probe(x[:300], y[:300], x[300:]) == y[300:]) > 0.9
    noise = rng.permutation(y)  # labels unrelated to the features: about chance
    assert np.mean(ridge_probe(x[:300], noise[:300], x[300:]) == noise[300:]) < 0.7


def test_builtin_encoder_separates_phantom_prompts():
    r = probe("builtin", n_train=300, n_test=100, seed=1)
    assert r["longest_prompt_tokens"] <= r["max_length"]  # the demo's 128 tokens hold every phantom prompt
    for name in ("cardiomegaly", "effusion", "nodules", "emphysema"):
        a = r["attributes"][name]
        assert a["accuracy"] >= 0.9 and a["accuracy"] > a["majority"], (name, a)


def test_phantom_prompts_are_deterministic_and_varied():
    a, b = phantom_prompts(20, seed=3), phantom_prompts(20, seed=3)
    assert a == b and len(set(a)) > 10 and all(": " in p for p in a)
