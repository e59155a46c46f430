"""The job machinery: from files and options to outputs, records and a summary, on one or many devices.

Inputs and outputs (``inputs``, ``globs``, ``pairs``), the one batch loop
(``batch``: skipping, isolating failures, records) with its helpers
(``claims``, ``resume``, ``report``, ``memory``), each command's work
(``run``, ``apply``, ``mask``; ``film``: a film through trained networks and the
frames a style trains on), the plan a face submits and the executor it
names (``plan``), and the two executors beyond this process (``devices``: one
worker process per device; ``ray_executor``: the actors of a Ray cluster).
It may import every layer below it; the
method never imports it. It never prints: what a user sees goes through
``batch.Events``.
"""
