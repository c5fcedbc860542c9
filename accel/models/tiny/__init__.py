"""Tiny pipelines of each supported architecture, fabricated offline from a seed (random weights).

Each builder returns an in-memory pipeline; `accel.models.loading` saves it once with
`save_pretrained` and loads it back through `from_pretrained`, the same path real weights take.
"""
from accel.models.tiny import flux, hunyuan_video, sd3, sdxl, wan

BUILDERS = {
    "flux": flux.build,
    "sd3": sd3.build,
    "sdxl": sdxl.build,
    "hunyuan_video": hunyuan_video.build,
    "wan": wan.build,
}
