"""The seed's library: processes, references, updates, the LRU cache and recovery.

Import order inside: ``process`` uses ``recovery``, which uses ``update``, which
uses ``reference``; all of them reach Redis only through ``phonon_cli.store``.
"""
