"""Data layer (docs/data.md).

preprocess     canonical orientation, HU, grid resampling, value ranges (the one place for them)
sources        phantoms, NIfTI folder + CSV          ctrate    CT-RATE layout
dicom_source   DICOM series + reports CSV            phantom / phantom_report / anatomy: synthetic studies
features       TFDS feature spec, example assembly   writer    resumable parallel array_record writer
side           source_id-keyed side datasets         pipelines grain pipelines for CT-ViT, SR, MaskGIT
command        `ctgen prepare`
"""
