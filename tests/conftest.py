import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    """A tiny FLUX pipeline, loaded through from_pretrained, for one test module."""
    from tests.helpers import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture(scope="module")
def baseline(pipe):
    from tests.helpers import generate

    return generate(pipe)
