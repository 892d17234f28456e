"""Separate processes that produce what the service hosts: reward models, references, policies."""
