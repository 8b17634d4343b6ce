"""Text-to-CT generation (`ctgen generate`): sampling settings, checkpoints, geometry, outputs.

    ctgen generate "64 years old female: Cardiomegaly. Bilateral pleural effusion." --out out/ --checkpoints ckpt/
    ctgen generate --prompts reports.csv --out out/ --checkpoints ckpt/ --config.maskgit.steps=12
    ctgen generate --config configs/generate.py:paper,steps=4,sr_steps=5 ...   # shorter sampling

Variant:
  paper  GenerateCT's sampling: MaskGIT 18 steps, classifier-free guidance scale 5, temperature 0.9
         (annealed to 0 over the steps); super-resolution 25 ancestral steps without guidance,
         low-res conditioning noise level 0.1.
Settings after the variant (0 = the variant's value): slices=N, steps=N (MaskGIT), sr_steps=N.

The command-line options of `ctgen generate` set these fields (an explicit option wins over a
`--config.*` override of the same field): --seed seed, --num-samples num_samples, --slices slices,
--steps maskgit.steps, --cond-scale maskgit.cond_scale, --temperature maskgit.temperature, --no-sr
superres.enabled=False, --sr-sampler superres.sampler, --sr-steps superres.steps, --dicom
outputs.dicom, --checkpoints checkpoints.dir, --no-compile-cache compile_cache.enabled=False,
--prompt-template prompt_template.

Fields:
  seed, num_samples      run seed (each sample's own seed derives from it, its name and index)
  slices                 slices of the volume (1 + 2k); 0 = the CT-ViT's max_slices
  prompt_template        "paper", "findings" or a build_prompt template (use the one the model was trained with)
  text_max_length        T5 tokens per prompt (GenerateCT: 256; longer prompts are cut)
  maskgit.*              steps, cond_scale, temperature, batch_size (prompts decoded together, split over
                         the local devices; 0 = one per batch shard of the mesh), attention_block (tokens
                         per block of the CPU's blocked attention, whatever the model trained with; 0 = the
                         model's own; 2048 measured fastest at 201 slices, docs/maskgit.md), draw ("cdf":
                         exact two-level inverse CDF, or "gumbel": GenerateCT's Gumbel-max, the same
                         distribution, ~0.8 s slower per step at 201 slices)
  superres.*             enabled, sampler ("ancestral" | "ddim"), steps, cond_scale, lowres_noise_level,
                         threshold (x0 dynamic-thresholding percentile, GenerateCT 0.95; 0 = clip to [-1, 1]),
                         average (samples per slice averaged, 1 = GenerateCT's single sample; K costs K x),
                         batch_size (slices per SR batch over all local devices; 0 = as many as memory allows),
                         scale (output size / CT-ViT image size; GenerateCT: 128 -> 512 = 4)
  checkpoints.dir        a directory with text/, ctvit/, maskgit/, superres/; checkpoints.<stage>
                         names one stage's directory elsewhere (e.g. checkpoints.text=builtin)
  geometry.extent_mm     body extent (D, H, W) in mm; voxel spacing = extent / shape (the training grid's)
  layout                 "auto" | "canonical" | "generatect": the models' array layout (docs/generate.md)
  generatect_axcodes     voxel axes of the files GenerateCT-layout models were trained on (default "LPS")
  outputs.*              dicom (also write a DICOM series), preview (PNG)
  compile_cache.*        enabled, dir ("" = $CTGEN_COMPILE_CACHE or $XDG_CACHE_HOME/ctgen/jax)
  progress_bar           per-stage progress bars on a terminal (process 0 only)
  mesh.*, sharding_rules devices of each process's mesh (data=-1: all local devices); see README Sharding
  distributed.*          multi-host initialisation, as for training
"""
import ml_collections

from ctgen.configuration import parse_arg
from ctgen.parallel.axes import DEFAULT_RULES
from ctgen.parallel.distributed import distributed_config
from ctgen.generate.orientation import CTRATE_AXCODES
from ctgen.volume import DEFAULT_EXTENT_MM


def get_config(arg: str = "paper"):
    a = parse_arg(arg, variants=("paper",), slices=0, steps=0, sr_steps=0)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_samples = 1
    c.slices = a.slices
    c.prompt_template = "paper"
    c.text_max_length = 256
    c.maskgit = ml_collections.ConfigDict({"steps": a.steps or 18, "cond_scale": 5.0, "temperature": 0.9,
                                           "batch_size": 0, "attention_block": 2048, "draw": "cdf"})
    c.superres = ml_collections.ConfigDict({
        "enabled": True, "sampler": "ancestral", "steps": a.sr_steps or 25, "cond_scale": 1.0,
        "lowres_noise_level": 0.1, "threshold": 0.95, "average": 1, "batch_size": 0, "scale": 4})
    c.checkpoints = ml_collections.ConfigDict({"dir": "", "text": "", "ctvit": "", "maskgit": "", "superres": ""})
    c.geometry = ml_collections.ConfigDict({"extent_mm": tuple(DEFAULT_EXTENT_MM)})
    c.layout = "auto"
    c.generatect_axcodes = CTRATE_AXCODES
    c.outputs = ml_collections.ConfigDict({"dicom": False, "preview": True})
    c.compile_cache = ml_collections.ConfigDict({"enabled": True, "dir": ""})
    c.progress_bar = True
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = tuple((name, axes) for name, axes in DEFAULT_RULES)
    c.distributed = distributed_config()
    return c
