"""The data layer: split files -> rows (manifest) -> decoded clips (clips, sandbox) -> the clip cache
(pipeline: Ray Data, once; cache) -> a rank's batches (loader) -> model input (augment); plus
``data check`` (check) and the embedded synthetic dataset (synthetic)."""
