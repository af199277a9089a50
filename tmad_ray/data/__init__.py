"""The data layer: split files -> rows (manifest) -> clips (clips, decord) -> Ray Data decode
into the clip cache (pipeline, cache) -> clip datasets; plus the embedded synthetic dataset."""
