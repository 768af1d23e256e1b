"""Bytes on storage: backends, the commit protocol, writing and reading planned bytes. No collectives."""
