"""Integrations of tiercache with the libraries GPU pipelines are built on (each an optional extra)."""
