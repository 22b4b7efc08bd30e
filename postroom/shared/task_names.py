"""Names that the API and the workers must agree on, kept once."""

SEND_TASK = "postroom.send_email"
DEFAULT_QUEUE = "email"
