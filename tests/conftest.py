"""Test session setup: 8 CPU devices, so mesh tests run on a real multi-device mesh."""

import os

# Must be set before jax initialises its backend.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
