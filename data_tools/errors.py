"""Exceptions raised by data_tools; each message names the file (and line or field) at fault."""

from __future__ import annotations


class DataToolsError(Exception):
    """Base class: a problem with the user's inputs or settings, reported without a traceback."""


class InputNotFoundError(DataToolsError):
    """A file, directory or glob given as input matched nothing readable."""


class MalformedRecordError(DataToolsError):
    """A record could not be turned into a document (raised only under --strict)."""


class CorruptShardError(DataToolsError):
    """A compressed or columnar file is truncated or damaged."""


class SpecError(DataToolsError):
    """A mix spec (YAML) has a missing or invalid value."""


class StaleDatasetError(DataToolsError):
    """A tokenized dataset changed after the mix that uses it was built."""
