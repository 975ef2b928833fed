"""Customer.io's classic Track API coming in (docs/track-api-coming-in.md).

``mapping`` turns Track requests into Pipelines calls, ``validation`` holds
Track's own limits, ``routes`` puts the endpoints on the app.  From there on
the calls take the Pipelines path: ``Ingest.prepare_calls``, then the spool.
"""
