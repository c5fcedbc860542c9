"""The parts tiny pipelines share, fabricated offline from a seed (random weights): local tokenizers
(`tokenizers`) and small text encoders and VAEs (`parts`). Each family's module (accel.families)
builds its own tiny pipeline from them; `accel.models.loading` saves it once with `save_pretrained`
and loads it back through `from_pretrained`, the path real weights take."""
