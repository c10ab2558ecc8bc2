import os

# Nothing in the suite may reach a hub; a stray call fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402

from script_fixtures import write_corpus, write_teacher  # noqa: E402


# The tiny corpus and teacher of the script's tests, made once per test module.
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_teacher(str(tmp_path_factory.mktemp("teacher")))
