"""Every registered strategy. Importing this package registers them all.

Adding a strategy is one module here (registering itself with `accel.registry.register`), one
line below and one YAML option in `conf/<stage>/`.
"""
from accel.strategies import compile, fbcache, mbcache, quant, teacache  # noqa: F401
