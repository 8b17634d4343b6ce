"""Text-to-CT generation (`ctgen generate`, docs/generate.md).

prompts      prompts from the command line or a file; output names; per-sample seeds
checkpoints  `--checkpoints DIR`: one weights directory per stage, checked
cascade      `run_cascade`: T5 -> MaskGIT -> CT-ViT decode -> super-resolution (the models' part)
orientation  GenerateCT's array layout -> ctgen's canonical orientation
outputs      NIfTI / DICOM / preview / provenance files, written atomically; what counts as finished
provenance   checkpoint hashes, versions, devices, peak memory
runtime      persistent compilation cache, compile time apart from run time, progress bars
command      the `ctgen generate` command line
"""
