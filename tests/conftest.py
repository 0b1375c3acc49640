import os, pathlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Keep CPU runs reproducible and polite on small machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")

@pytest.fixture(scope="session")
def root():
    return ROOT
