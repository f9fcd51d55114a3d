"""The HTTP layer: routes per domain, their dependencies, and the middleware around them.

Routes parse a request, call one service method (``app/jobs/service.py``,
``app/serving/service.py``) and send its answer; nothing here holds a rule of
the domain.
"""
