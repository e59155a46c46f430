"""The job machinery: from files and options to outputs, records and a summary, on one or many devices.

Inputs and outputs (``inputs``, ``globs``, ``pairs``), the one batch loop
(``batch``: skipping, isolating failures, records) with its helpers
(``claims``, ``resume``, ``report``, ``memory``), each command's work
(``run``, ``apply``, ``mask``), the plan a face submits (``plan``) and the
executors that hand pairs out (``executors``: this process, ``--devices``
worker processes, a Ray cluster). It may import every layer below it; the
method never imports it. It never prints: what a user sees goes through
``batch.Events``.
"""
