"""Test-suite settings.

Under CI (``CI`` set) hypothesis runs derandomised: the same examples every run, so a
submission's result does not depend on chance. Developers' runs explore new examples each
time; a failure they find is kept in hypothesis's local database and replayed first.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
