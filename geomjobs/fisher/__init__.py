"""The Fisher metric of 2-D families (Lobashev et al.; docs/fisher.md)."""
