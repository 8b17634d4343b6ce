"""The built-in demo cascade mechanism: packing bfloat16 weights with a manifest, `ctgen generate`
without --checkpoints running it with its own settings, provenance naming it, hashes checked."""
import json
import os

import numpy as np
import pytest
from flax import nnx

from ctgen.cli import main
from ctgen.convert.ctvit_store import load_ctvit, save_ctvit_dir
from ctgen.convert.maskgit_store import save_maskgit_dir
from ctgen.convert.superres_store import save_superres_dir
from ctgen.generate import demo_cascade
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.models.maskgit import MaskGIT, MaskGITConfig
from ctgen.models.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny random cascade packed the way the shipped one is, with small generation settings."""
    root = tmp_path_factory.mktemp("demo")
    src = root / "src"
    ctvit_cfg = CTViTConfig.tiny(max_slices=5)
    ctvit = CTViT(ctvit_cfg, rngs=nnx.Rngs(0))
    save_ctvit_dir(str(src / "ctvit"), ctvit_cfg, nnx.state(ctvit))
    mcfg = MaskGITConfig.tiny(dim_context=64, num_tokens=64)
    save_maskgit_dir(str(src / "maskgit"), mcfg, nnx.state(MaskGIT(mcfg, rngs=nnx.Rngs(1))))
    ucfg = UNetConfig.tiny()
    save_superres_dir(str(src / "superres"), ucfg, nnx.state(UNet(ucfg, rngs=nnx.Rngs(2)), nnx.Param))
    out = str(root / "demo_cascade")
    settings = {"slices": 3, "maskgit.steps": 2, "superres.steps": 2, "superres.scale": 2, "text_max_length": 32,
                "maskgit.batch_size": 2}
    man = demo_cascade.main(["pack", "--ctvit", str(src / "ctvit"), "--maskgit", str(src / "maskgit"),
                             "--superres", str(src / "superres"), "--out", out]
                            + [f"--set={k}={v}" for k, v in settings.items()])
    assert man == 0
    return out, ctvit


def test_pack_writes_bfloat16_weights_and_a_manifest(packed):
    out, ctvit = packed
    man = demo_cascade.read_manifest(out)
    assert man["name"] == demo_cascade.NAME and "not a chest-CT model" in man["description"]
    assert man["generate"]["slices"] == 3 and man["generate"]["geometry.extent_mm"] == [301.5, 350.0, 350.0]
    assert set(man["stages"]) == {"ctvit", "maskgit", "superres"} and man["stages"]["maskgit"]["layout"] == "canonical"
    assert all(rel.split("/")[0] in man["stages"] for rel in man["files"])
    assert man["bytes"] == sum(os.path.getsize(os.path.join(out, rel)) for rel in man["files"])
    # loaded back as float32: the bfloat16 rounding of the original, not the original itself
    loaded = load_ctvit(os.path.join(out, "ctvit"))
    import jax

    pairs = zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(ctvit, nnx.Param))),
                jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded, nnx.Param))))
    err = [(np.abs(np.asarray(a) - np.asarray(b)).max(), np.abs(np.asarray(a)).max(), np.asarray(b).dtype)
           for a, b in pairs]
    assert all(dtype == np.float32 for _, _, dtype in err)
    assert 0 < max(e for e, _, _ in err) and all(e <= m * 2 ** -8 for e, m, _ in err)


def test_generate_without_checkpoints_runs_the_demo(packed, tmp_path, capsys, monkeypatch):
    out_dir, _ = packed
    monkeypatch.setattr(demo_cascade, "default_dir", lambda: out_dir)
    out = str(tmp_path / "out")
    assert main(["generate", "64 years old female: Cardiomegaly.", "--name", "heart", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "using the ctgen built-in phantom demo cascade" in printed
    prov = json.loads(open(os.path.join(out, "provenance", "heart.json")).read())
    assert prov["models"].startswith(demo_cascade.NAME)
    assert prov["config"]["slices"] == 3 and prov["config"]["superres"]["scale"] == 2
    assert prov["config"]["checkpoints"]["dir"] == out_dir and prov["config"]["checkpoints"]["text"] == "builtin"
    # trained by ctgen, so the output is not re-oriented as if it came from GenerateCT's layout
    assert prov["request"]["settings"]["layout"] == "canonical"
    import nibabel as nib

    assert sorted(nib.load(os.path.join(out, "heart.nii.gz")).shape) == [3, 64, 64]
    # the user's options and overrides win over the demo's settings
    assert main(["generate", "Cardiomegaly.", "--out", out, "--slices", "5", "--no-sr", "--config.superres.scale=3",
                 "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "slices: 5" in printed and "scale: 3" in printed and "enabled: false" in printed
    assert "text_max_length: 32" in printed  # the demo's own setting where the user gave none


def test_a_damaged_demo_is_refused(packed, tmp_path, capsys, monkeypatch):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(packed[0], broken)
    marker = os.path.join(broken, "maskgit", "ctgen_weights.json")
    with open(marker, "a") as f:
        f.write(" ")
    monkeypatch.setattr(demo_cascade, "default_dir", lambda: broken)
    assert main(["generate", "Cardiomegaly.", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "maskgit/ctgen_weights.json: content differs from the one shipped" in err and "reinstall" in err
    os.remove(os.path.join(broken, demo_cascade.MANIFEST))
    assert main(["generate", "Cardiomegaly.", "--out", str(tmp_path / "o")]) == 2
    assert "the built-in demo cascade is not complete" in capsys.readouterr().err
    monkeypatch.setattr(demo_cascade, "default_dir", lambda: str(tmp_path / "empty"))
    assert main(["generate", "Cardiomegaly.", "--out", str(tmp_path / "o")]) == 2
    assert "no built-in demo cascade here" in capsys.readouterr().err


def test_which_runs_use_the_demo():
    assert demo_cascade.uses_demo(None, [])
    assert demo_cascade.uses_demo(None, [("maskgit.steps", "4")])
    assert not demo_cascade.uses_demo("ckpt/", [])
    assert not demo_cascade.uses_demo(None, [("checkpoints.maskgit", "'m/'")])


def test_a_cascade_packed_stage_by_stage_keeps_the_first_stage_byte_for_byte(packed, tmp_path):
    """A finished stage packed alone (committed once), then the full pack naming that packed
    directory: its files are copied, not re-written, so their hashes do not change; a partial pack
    writes no manifest and removes a stale one."""
    full, _ = packed
    src = full  # its stage directories stand in for the training workdirs
    out = str(tmp_path / "assets")
    assert demo_cascade.main(["pack", "--ctvit", os.path.join(src, "ctvit"), "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["ctvit"] and not demo_cascade.available(out)
    first = demo_cascade._files(out)
    assert first and all(rel.startswith("ctvit/") for rel in first)
    # the shipped manifest's record of the CT-ViT is the same file, byte for byte
    shipped = demo_cascade.read_manifest(full)["files"]
    assert all(shipped[rel] == digest for rel, digest in first.items())
    assert demo_cascade.main(["pack", "--ctvit", os.path.join(out, "ctvit"), "--maskgit", os.path.join(src, "maskgit"),
                              "--superres", os.path.join(src, "superres"), "--out", out]) == 0
    man = demo_cascade.read_manifest(out)
    assert {rel: d for rel, d in man["files"].items() if rel.startswith("ctvit/")} == first
    assert man["stages"]["ctvit"]["parameters"] == demo_cascade.read_manifest(full)["stages"]["ctvit"]["parameters"]
    assert man["stages"]["maskgit"]["layout"] == "canonical"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".pack-") or n.endswith(".old")]
    # a partial pack over a full cascade leaves no manifest whose hashes would no longer hold
    assert demo_cascade.main(["pack", "--maskgit", os.path.join(src, "maskgit"), "--out", out]) == 0
    assert not demo_cascade.available(out) and sorted(os.listdir(out)) == ["ctvit", "maskgit", "superres"]
    from ctgen.errors import UserError

    with pytest.raises(UserError, match=r"not complete in this version of ctgen \(packed so far: ctvit, maskgit, "
                                        r"superres; no demo_cascade.json"):
        demo_cascade.read_manifest(out)


def test_pack_names_a_missing_stage_directory(tmp_path):
    from ctgen.errors import UserError

    with pytest.raises(UserError, match=r"nowhere: no such directory \(--maskgit\)"):
        demo_cascade.pack(None, str(tmp_path / "nowhere"), None, str(tmp_path / "out"))
    with pytest.raises(UserError, match="give at least one"):
        demo_cascade.pack(None, None, None, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_pack_refuses_a_packed_stage_in_the_wrong_slot(packed, tmp_path):
    from ctgen.errors import UserError

    with pytest.raises(UserError, match=r"a packed 'maskgit' stage, not a 'ctvit' one \(--ctvit\)"):
        demo_cascade.pack(os.path.join(packed[0], "maskgit"), None, None, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not os.listdir(tmp_path)


def test_checkpoints_of_a_packed_cascade_bring_its_settings(packed, tmp_path, capsys):
    """`--checkpoints DIR` on a folder made by `pack` applies its manifest's generation settings and
    the built-in T5 (the folder has no text/), as the built-in demo does; the user's options win."""
    out_dir, _ = packed
    out = str(tmp_path / "out")
    assert main(["generate", "Cardiomegaly.", "--checkpoints", out_dir, "--out", out, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "slices: 3" in printed and "text_max_length: 32" in printed and "text: builtin" in printed
    assert main(["generate", "Cardiomegaly.", "--checkpoints", out_dir, "--out", out, "--slices", "5",
                 "--print-config"]) == 0
    assert "slices: 5" in capsys.readouterr().out
    # the same folder named through the config override
    assert main(["generate", "Cardiomegaly.", f"--config.checkpoints.dir={out_dir}", "--out", out,
                 "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "slices: 3" in printed and "text: builtin" in printed
    assert main(["generate", "64 years old female: Cardiomegaly.", "--name", "heart", "--checkpoints", out_dir,
                 "--out", out]) == 0
    assert "no --checkpoints" not in capsys.readouterr().out
    prov = json.loads(open(os.path.join(out, "provenance", "heart.json")).read())
    assert prov["models"].startswith(f"--checkpoints {out_dir} (a packed cascade")
    assert prov["config"]["superres"]["scale"] == 2 and prov["config"]["checkpoints"]["text"] == "builtin"
    # a plain checkpoints folder (no manifest) gets no settings it did not ask for
    plain = str(tmp_path / "plain")
    import shutil

    shutil.copytree(out_dir, plain)
    os.remove(os.path.join(plain, demo_cascade.MANIFEST))
    assert main(["generate", "Cardiomegaly.", "--checkpoints", plain, "--out", out, "--print-config",
                 "--config.checkpoints.text=builtin"]) == 0
    printed = capsys.readouterr().out
    assert "slices: 3" not in printed and "text_max_length: 32" not in printed
