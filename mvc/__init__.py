"""mvc: version control for model weights, one tensor at a time."""

from .errors import MvcError
from .repo import Repo

__version__ = "0.1.0"
__all__ = ["MvcError", "Repo", "__version__"]
