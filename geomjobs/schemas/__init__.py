"""JSON schemas of geomjobs, installed as ``geomjobs.schemas`` (data: no code imports from here).

``job.schema.json`` (job specs, :mod:`geomjobs.spec`), ``fisher.schema.json`` (Fisher jobs) and one
``record.v<N>.json`` per record schema version (:mod:`geomjobs.records`; ``SCHEMA_VERSION`` is the
one new datasets are written in). Every version's file stays: a dataset keeps the version it was
created with, and readers open them all. v2 = v1 + ``cfg_scale``.
"""
