"""``python -m transcend.cli``."""

from transcend.cli import entry

entry()
