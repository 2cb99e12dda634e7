"""dreamrt: a real-time runtime for learned robot policies and world models.

The top-level folders of the repository are the subpackages (``dreamrt.episodes`` is
``episodes/``); see ``docs/architecture.md``.
"""

__version__ = "0.1.0"
