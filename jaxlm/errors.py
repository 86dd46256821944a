"""Errors a user causes (a bad file, field or value), as opposed to a bug in jaxlm."""


class UserError(ValueError):
  """Its message names the culprit and what is allowed; binaries print it as one line."""
