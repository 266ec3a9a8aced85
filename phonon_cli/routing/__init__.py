"""Routing: from an event to the updates it feeds.

``templates`` (ids, specs, docs built from an event), ``filters`` (``when``),
``fields`` (a route's declared fields), ``codegen`` (one generated function per
route) and ``routes`` (``Route`` and ``Router``, which use all of them).
"""
