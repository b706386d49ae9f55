import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
logging.getLogger("saelora").setLevel(logging.INFO)


@pytest.fixture
def llama():
    from tiny import tiny_llama

    return tiny_llama()


@pytest.fixture
def gpt2():
    from tiny import tiny_gpt2

    return tiny_gpt2()
