"""What the HTTP server serves (http.py is the server itself).

- replies.py  the request and answer records, JSON and error answers
- router.py   method + path pattern -> handler, with 404 and 405
- auth.py     the Bearer tokens of writes
- bodies.py   the JSON bodies of writes, validated (pure)
- api.py      /api/status, /api/runs, the write actions
- sse.py      /api/events: one LISTEN fanned out to bounded client queues
- probes.py   /healthz, /status, /metrics
- static.py   the dashboard's files (static/), with their security headers
- app.py      all of it wired over one worker
"""
