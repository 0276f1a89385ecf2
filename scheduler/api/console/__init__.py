"""The operator console at ``/ui``: server-rendered pages (Jinja2) kept live by one
small script that re-fetches each page's live fragments every 2 s."""
