"""Every registered strategy. Importing this package registers them all.

Adding a strategy is one module here (registering itself with `accel.registry.register`), its name
in the line below and one YAML option in `conf/<stage>/`.
"""
from accel.strategies import attention, compile, fbcache, mbcache, parallel, quant, teacache, triton_attention  # noqa: F401
