"""JSON schemas of geomjobs (job spec, record schema); installed as ``geomjobs.schemas``."""
