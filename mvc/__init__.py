"""mvc: version control for model weights, one tensor at a time."""

from .errors import MvcError
from .repo import Repo


def _lazy_fetcher(repo, remote: str):
    """The remote layer's fetcher for lazy clones, handed to the core (which never imports mvc.remote)."""
    from .remote.sync import lazy_fetcher

    return lazy_fetcher(repo, remote)


Repo.lazy_fetcher_factory = staticmethod(_lazy_fetcher)

__version__ = "0.1.0"
__all__ = ["MvcError", "Repo", "__version__"]
