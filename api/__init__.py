"""The intake API: validates requests and enqueues them by task name."""
