"""Code that both the intake API and the workers need: settings, schemas, errors, Redis."""
