"""Data layer (docs/data.md). Geometry and value ranges are `ctgen.volume`'s.

preprocess     HU volume in file order -> example on the grid (resampling, checks)
sources        phantoms, NIfTI folder + CSV          ctrate    CT-RATE layout
dicom_source   DICOM series + reports CSV            phantom / phantom_report / anatomy: synthetic studies
features       TFDS feature spec, example assembly   writer    resumable parallel array_record writer
side           source_id-keyed side datasets         pipelines grain pipelines for CT-ViT, SR, MaskGIT
embeddings     T5 embedding cache (a side dataset)   command   `ctgen prepare`
"""
