"""The Fisher metric of 2-D families (Lobashev et al.; SPEC sections 4 and 8)."""
