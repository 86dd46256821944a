"""Damage done to a checkpoint on disk, as a bad disk or a cut-off copy would do it."""

import os


def flip_a_byte(step_dir) -> None:
  """Inverts one byte in the middle of the step's largest data file."""
  files = [os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names
           if 'manifest' not in f]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
