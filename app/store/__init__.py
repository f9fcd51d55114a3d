"""Persistent state: jobs, their metrics, models; two interchangeable stores.

``base`` holds the records and the ``Store`` protocol (records and bytes only),
``sqlite`` the embedded store (SQLite plus files in the data directory),
``postgres`` the shared one for scale-out (with its connection ``pool``),
``check`` the ``charnn check`` of a data directory. Nothing here imports the
HTTP layer or the job runners.
"""
