"""Test fixtures: nequip's own model-test fixtures (as Allegro does), plus helpers."""

from nequip.utils.unittests import CONFTEST_PATH

# nequip's fixtures (dtype loop, molecules, bulk, datasets) are shared by the model harness
exec(open(CONFTEST_PATH).read())

