"""Message templates: the store, the bounded Jinja2 sandbox, and rendering at intake."""
